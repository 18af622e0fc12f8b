"""Time to resume: a simulation killed with SIGKILL mid-round, then ``fedrec simulate --resume``.

    python -m simulations.bench_resume --rounds 4 --kill-in-round 3 --clients 3

Runs the same small simulation twice: once straight through, once killed (kill -9 of the
process that hosts the ServerApp, then of what it started: Ray and its workers, as when the
machine dies) while round ``--kill-in-round`` is in flight, and resumed. Prints when the kill
came, how long the resumed ServerApp took to restore the run, how long the resume command took
to commit its first round, the work lost, and whether the final adapters agree (without DP the
training replays exactly from the seed, so they must).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

from deployment.localhost import process_tree, signal_all

SMALL = ["model-layers=2", "max-users=30", "local-steps=2", "batch-size=8"]


def simulate_cmd(run_dir: Path, clients: int, rounds: int, settings: list[str]) -> list[str]:
    return [sys.executable, "-m", "common.cli", "simulate", "--clients", str(clients), "--rounds", str(rounds),
            "--run-dir", str(run_dir), "--set", *settings]


def resume_cmd(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "common.cli", "simulate", "--resume", str(run_dir)]


def metrics_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def kill_hard(proc: subprocess.Popen) -> None:
    """SIGKILL the process, then every process it started (Ray's GCS, raylet and workers): what
    is left when the machine running the server dies."""
    tree = process_tree(proc.pid)  # the process first: it dies before what it started
    signal_all(tree, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tree[1:], timeout=30)


def run_until(cmd: list[str], env: dict, condition, timeout: float = 1800) -> tuple[subprocess.Popen, float]:
    """Start ``cmd``; SIGKILL it (and its descendants) as soon as ``condition()`` holds.
    Returns the process and the seconds it ran."""
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not condition():
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) before the kill:\n{proc.stdout.read()[-3000:]}")
            if time.time() - started > timeout:
                raise TimeoutError("the kill condition never held")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            kill_hard(proc)
    return proc, time.time() - started


def timed(cmd: list[str], run_dir: Path, env: dict, committed: int) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` (which finds ``committed`` rounds in ``run_dir``); (its result, seconds until it
    committed a round, its wall time)."""
    started = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    while proc.poll() is None:
        if first is None and metrics_rows(run_dir) > committed:
            first = time.time() - started
        time.sleep(0.05)
    out = proc.stdout.read()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out), first or float("nan"), time.time() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--kill-in-round", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(f"/tmp/fedrec-resume-{time.strftime('%Y%m%d-%H%M%S')}"))
    parser.add_argument("--set", nargs="*", default=SMALL + ["dp=false", "popularity-prior=false"])
    args = parser.parse_args(argv)
    env = {**os.environ, "FEDREC_HOME": str(args.root / "home")}
    console = Console()

    straight = args.root / "straight"
    done, fresh_first_s, straight_s = timed(simulate_cmd(straight, args.clients, args.rounds, args.set), straight,
                                            env, 0)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:])

    killed = args.root / "killed"
    committed = args.kill_in_round - 1
    # Half a round after round kill-in-round − 1 was committed: mid-round.
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    half_round = (rows[-1]["elapsed-s"] - rows[0]["elapsed-s"]) / max(len(rows) - 1, 1) / 2
    seen: dict = {}

    def mid_round() -> bool:
        if metrics_rows(killed) >= committed and "at" not in seen:
            seen["at"] = time.time()
        return "at" in seen and time.time() - seen["at"] >= half_round

    _, killed_after = run_until(simulate_cmd(killed, args.clients, args.rounds, args.set), env, mid_round)
    resumed, first_s, resume_wall = timed(resume_cmd(killed), killed, env, committed)
    if resumed.returncode != 0:
        raise SystemExit(resumed.stdout[-3000:])
    restore = json.loads((killed / "resumes.jsonl").read_text().splitlines()[-1])
    final = f"adapters/round-{args.rounds:03d}/adapter_model.safetensors"
    a, b = load_file(straight / final), load_file(killed / final)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)

    table = Table(title=f"kill -9 in round {args.kill_in_round} of {args.rounds}, {args.clients} clients "
                        f"({' '.join(args.set)})")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in [
        ("uninterrupted run, wall (s)", f"{straight_s:.1f}"),
        ("killed after (s)", f"{killed_after:.1f}"),
        ("half a round, the kill point after the commit (s)", f"{half_round:.1f}"),
        ("ServerApp start → run restored: model, ledger, adapter (s)", f"{restore['restore-s']:.2f}"),
        (f"resume command → round {committed + 1} committed (s)", f"{first_s:.1f}"),
        ("for comparison: fresh start → round 1 committed (s)", f"{fresh_first_s:.1f}"),
        ("resume command, wall (s)", f"{resume_wall:.1f}"),
        ("killed + resumed vs uninterrupted, wall", f"{(killed_after + resume_wall) / straight_s:.2f}×"),
        ("discarded: metrics rows / adapters", f"{restore['discarded-metrics-rows']} / "
                                               f"{', '.join(restore['discarded-adapters']) or '—'}"),
        ("final adapter, max |Δ| vs uninterrupted", f"{diff:.2e} (max |θ| {scale:.2f})"),
    ]:
        table.add_row(name, value)
    console.print(table)
    (args.root / "resume.json").write_text(json.dumps({
        "straight-s": straight_s, "killed-after-s": killed_after, "restore-s": restore["restore-s"],
        "first-round-s": first_s, "fresh-first-round-s": fresh_first_s, "resume-wall-s": resume_wall,
        "max-abs-diff": diff}, indent=1))


if __name__ == "__main__":
    main()
