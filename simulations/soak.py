"""Soak: a long small simulation, watching the resident memory of the server and the clients.

    python -m simulations.soak --rounds 50 --clients 3 --set model-layers=2 max-users=30 local-steps=2 batch-size=8

Runs ``fedrec simulate`` in a subprocess (the ServerApp runs in that process; each simulated
client in a Ray worker) and samples RSS when each round's metrics row appears: the server's
process and every Ray ``ClientAppActor`` worker. Prints RSS at a few rounds and the growth of the
median RSS from the 5 rounds after warm-up (``--warmup``) to the 5 before the last, in %, and
writes ``soak.json``. With 2 CPUs, Ray runs the clients in 2 workers whatever their number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import Progress
from rich.table import Table


def client_workers(root: psutil.Process) -> list[psutil.Process]:
    """This run's Ray client actors: descendants of the run's process (Ray's raylet is started by
    it) whose process title names the actor class; other simulations on the machine are not counted."""
    workers = []
    for p in root.children(recursive=True):
        try:
            if "ClientAppActor" in " ".join(p.cmdline()) or "ClientAppActor" in p.name():
                workers.append(p)
        except psutil.NoSuchProcess:
            pass
    return workers


def rss_mb(processes: list[psutil.Process]) -> list[float]:
    out = []
    for p in processes:
        try:
            out.append(p.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            pass
    return out


def window_median(samples: list[dict], key: str) -> float:
    values = [v for s in samples for v in (s[key] if isinstance(s[key], list) else [s[key]])]
    return statistics.median(values)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--root", type=Path, default=Path(f"/tmp/fedrec-soak-{time.strftime('%Y%m%d-%H%M%S')}"))
    parser.add_argument("--set", nargs="*", default=["model-layers=2", "max-users=30", "local-steps=2", "batch-size=8"])
    args = parser.parse_args(argv)
    run = args.root / "run"
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", str(args.rounds), "--clients",
           str(args.clients), "--run-dir", str(run), "--set", "client-epsilon-max=1000", *args.set]
    proc = subprocess.Popen(cmd, env={**os.environ, "FEDREC_HOME": str(args.root / "home")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = psutil.Process(proc.pid)
    samples, metrics = [], run / "metrics.jsonl"
    with Progress() as progress:
        task = progress.add_task("soak", total=args.rounds)
        while proc.poll() is None:
            rows = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            if rows > len(samples):
                workers = rss_mb(client_workers(server))
                samples.append({"round": rows, "server-mb": rss_mb([server])[0] if rss_mb([server]) else None,
                                "client-mb": workers, "time": time.time()})
                progress.update(task, completed=rows)
            time.sleep(0.2)
    if proc.returncode != 0 or len(samples) < args.rounds:
        raise SystemExit(f"the soak run failed after {len(samples)} rounds (exit {proc.returncode}); see {run}")
    # Windows of 5 rounds, not single samples: a worker's RSS moves by tens of MB from round to
    # round. The last round is left out: the server is already shutting Ray down when it lands.
    warm, last = samples[args.warmup - 1:args.warmup + 4], samples[-6:-1]
    growth = {"server-%": 100 * (window_median(last, "server-mb") / window_median(warm, "server-mb") - 1),
              "clients-%": 100 * (window_median(last, "client-mb") / window_median(warm, "client-mb") - 1),
              "windows": [[s["round"] for s in warm], [s["round"] for s in last]]}
    table = Table(title=f"{args.rounds}-round soak, {args.clients} clients ({' '.join(args.set)})")
    for col in ("round", "server RSS (MB)", "client workers RSS (MB, median / max)"):
        table.add_column(col, justify="right")
    for s in samples:
        if s["round"] in (1, args.warmup, args.rounds // 2, args.rounds - 1) and s["client-mb"]:
            table.add_row(str(s["round"]), f"{s['server-mb']:.0f}",
                          f"{statistics.median(s['client-mb']):.0f} / {max(s['client-mb']):.0f}")
    console = Console()
    console.print(table)
    console.print(f"growth, median RSS of rounds {args.warmup}–{args.warmup + 4} to rounds {args.rounds - 5}–"
                  f"{args.rounds - 1}: server {growth['server-%']:+.1f} %, client workers {growth['clients-%']:+.1f} %")
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "soak.json").write_text(json.dumps({"samples": samples, "growth": growth}, indent=1))
    return growth


if __name__ == "__main__":
    main()
