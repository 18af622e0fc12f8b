"""The ``fedrec`` command. It only dispatches: each party registers its own subcommands.

    fedrec client prepare | validate | reset-accountant   client/commands.py       (a site)
    fedrec client audit DATA_DIR [--ledger RUN_DIR]       audit/commands.py        (a site auditing its node)
    fedrec recommend RUN_DIR …                            server/commands.py       (the server operator)
    fedrec audit RUN_DIR …                                audit/commands.py        (an auditor)
    fedrec credentials DIR … / fedrec localhost SITE …    deployment/commands.py   (setting up a federation)
    fedrec simulate …                                     simulations/commands.py  (the simulator)

A party registers with an entry point in the ``fedrec.commands`` group (pyproject.toml): a
function that takes argparse's subparsers and adds its commands, each with ``func`` set. So
this module imports no party, and a plug-in adds a command the same way. A register function
that returns a subparsers object opens a group: an entry point named ``GROUP.NAME`` is given
that group's subparsers (``fedrec client audit`` is the auditor's code in the site's group).
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
    groups = {"": sub}
    for command in sorted(entry_points(group="fedrec.commands"), key=lambda e: (e.name.count("."), e.name)):
        group = command.name.rpartition(".")[0]
        if group not in groups:
            raise SystemExit(f"fedrec: entry point {command.name!r}: no command group {group!r} to add it to")
        opened = command.load()(groups[group])
        if opened is not None:
            groups[command.name] = opened
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
