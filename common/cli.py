"""The ``fedrec`` command. It only dispatches: each party registers its own subcommands.

    fedrec client prepare | validate | reset-accountant   client/commands.py       (a site)
    fedrec recommend RUN_DIR …                            server/commands.py       (the server operator)
    fedrec audit RUN_DIR …                                audit/commands.py        (an auditor)
    fedrec credentials DIR … / fedrec localhost SITE …    deployment/commands.py   (setting up a federation)
    fedrec simulate …                                     simulations/commands.py  (the simulator)

A party registers with an entry point in the ``fedrec.commands`` group (pyproject.toml): a
function that takes argparse's subparsers and adds its commands, each with ``func`` set. So
this module imports no party, and a plug-in adds a command the same way.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from rich.console import Console

console = Console()  # results
errors = Console(stderr=True, highlight=False)  # problems: stderr, so a pipe of results stays clean


def fail(message: str) -> None:
    """Print ``fedrec: message`` on stderr as one line, however long, and exit 2."""
    errors.print(f"fedrec: {message}", style="red", markup=False, soft_wrap=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedrec", description="Federated DP-LoRA recommender (Flower + PEFT + Opacus)")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in sorted(entry_points(group="fedrec.commands"), key=lambda e: e.name):
        command.load()(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
