"""A default ``fedrec simulate`` now against the same command at an earlier commit, back to back.

    python -m simulations.bench_before 89d948b^          # the code before the frozen-prefix cache
    python -m simulations.bench_before --report-only     # the table again, from --out/before.json

The earlier commit is checked out as a git worktree under ``--out`` and set up by its own
``setup.sh`` (its own ``.venv``: its code and its pins), then both default runs go one after the
other on this machine, each in a fresh ``FEDREC_HOME``, nothing else changed: wall time, the
last round's validation figures and the clients' ε with its unit, δ and accountant, as each
run's ``summary.json`` and ``config.json`` state them.
Writes ``--out/before.json`` and prints a table. Measure on an idle machine: a run beside
other work takes longer by however much that work takes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
console = Console()


def worktree(rev: str, out: Path) -> Path:
    """The code at REV, set up in its own venv by its own setup.sh."""
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    tree = out / f"code-{commit}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True,
                       capture_output=True)
    subprocess.run(["./setup.sh"], cwd=tree, check=True, capture_output=True)
    return tree


def default_run(code: Path, out: Path, label: str) -> dict:
    """``fedrec simulate`` with the defaults of the code in CODE; its wall time and summary."""
    run_dir = out / f"simulate-{label}-{int(time.time())}"
    env = {**os.environ, "FEDREC_HOME": str(out / f"home-{run_dir.name}")}
    console.print(f"default fedrec simulate, {label} ({code})")
    started = time.perf_counter()
    subprocess.run([str(code / ".venv" / "bin" / "fedrec"), "simulate", "--run-dir", str(run_dir)], env=env,
                   cwd=code, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    unit = json.loads((run_dir / "config.json").read_text())["privacy-unit"].split(" (")[0]
    return {"code": str(code), "wall-seconds": wall, "rounds": last["round"], "run-dir": str(run_dir),
            "val-ndcg@10": last.get("val-ndcg@10"), "val-hr@10": last.get("val-hr@10"),
            "epsilon-max": summary["client-epsilon-max"], "delta": summary["delta"],
            "accountant": summary["accountant"], "privacy-unit": unit}


def report(runs: dict) -> None:
    table = Table("code", "wall", "rounds", "validation NDCG@10", "validation HR@10")
    table.add_column("clients' ε max", overflow="fold")
    for name, r in runs.items():
        fmt = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(name, f"{r['wall-seconds']:.0f} s", str(r["rounds"]), fmt(r["val-ndcg@10"]), fmt(r["val-hr@10"]),
                      f"{r['epsilon-max']:.3f} ({r['privacy-unit']}, δ = {r['delta']:g}, {r['accountant'].upper()})")
    before, now = runs.values()
    table.caption = f"now / before: {now['wall-seconds'] / before['wall-seconds']:.2f}× the wall time"
    console.print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", nargs="?", help="the earlier commit, e.g. 89d948b^")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-before"))
    parser.add_argument("--report-only", action="store_true", help="print the table of OUT/before.json")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.report_only:
        runs = json.loads((out / "before.json").read_text())
    elif not args.rev:
        parser.error("name the earlier commit (or --report-only)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        runs = {f"before ({args.rev})": default_run(worktree(args.rev, out), out, "before"),
                f"now ({head})": default_run(ROOT, out, "now")}
        (out / "before.json").write_text(json.dumps(runs, indent=2))
    report(runs)
    return runs


if __name__ == "__main__":
    main()
