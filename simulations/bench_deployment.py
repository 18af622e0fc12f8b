"""Deployment vs simulation, with and without SecAgg+: seconds per round and bytes on the wire.

    python -m simulations.bench_deployment --sites 3 --rounds 4 --set max-users=150 local-steps=10
    python -m simulations.bench_deployment --no-secagg …      # the two engines only

Runs the same config four ways, one after the other: Flower's simulation engine (``fedrec
simulate``), the localhost Deployment Engine (``deployment/localhost.py``: SuperLink +
SuperNodes, TLS and node authentication), each with ``secure-aggregation`` false and true.
Seconds per round are the differences of the rounds' ``elapsed-s`` in ``metrics.jsonl`` (round 1
also loads the model, so the median is over rounds 2..R). Wire bytes are counted by a TCP relay
in front of each SuperNode, for the whole run (the app bundle download, the popularity-prior
query, every round's train and evaluate messages, heartbeats). Writes ``bench.json`` beside.
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

from rich.console import Console
from rich.table import Table

from common.config import Settings, defaults, parse_overrides
from deployment.localhost import deploy as deploy_sites
from simulations.partition import materialize


def deploy(root: Path, sites: int, overrides: dict) -> dict:
    """The simulated sites' folders, each given to its own SuperNode: one deployed run."""
    s = Settings.from_run_config({**defaults(), **overrides, "partition-dir": str(root / "data")})
    data = materialize(s, sites)
    return deploy_sites(root, [data / f"client-{k}" for k in range(sites)],
                        {**overrides, "partition-dir": str(root / "data")})


def simulate(root: Path, sites: int, overrides: dict) -> dict:
    run = root / "run"
    args = [f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in overrides.items() if k not in ("run-dir", "num-server-rounds")]
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--clients", str(sites), "--rounds",
           str(overrides["num-server-rounds"]), "--run-dir", str(run), "--set", *args]
    started = time.time()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "FEDREC_HOME": str(root / "home")})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed-s"] for r in rows]
    return {"rounds": len(rows), "wall-s": round(time.time() - started, 1), "first-round-s": elapsed[0],
            "round-s": [round(b - a, 1) for a, b in zip(elapsed, elapsed[1:])],
            "final": {k: rows[-1].get(k) for k in ("val-ndcg@10", "val-hr@10", "epsilon-max")}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--root", type=Path, default=Path(f"/tmp/fedrec-bench-{time.strftime('%Y%m%d-%H%M%S')}"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-secagg", action="store_true", help="only the two engines without SecAgg+")
    args = parser.parse_args(argv)
    args.root = args.root.resolve()  # the deployed processes run in their own folders
    base = {**parse_overrides(args.set), "num-server-rounds": args.rounds}
    results = {}
    for engine in ("simulation", "deployment"):
        for secure in (False,) if args.no_secagg else (False, True):
            name = f"{engine}{', SecAgg+' if secure else ''}"
            root = args.root / name.replace(", ", "-").replace("+", "plus")
            root.mkdir(parents=True)
            overrides = {**base, "secure-aggregation": secure, "run-dir": str(root / "run")}
            runner = simulate if engine == "simulation" else deploy
            results[name] = runner(root, args.sites, overrides)
            print(name, json.dumps(results[name]), flush=True)
    table = Table(title=f"{args.sites} clients, {args.rounds} rounds, {' '.join(args.set)} "
                        f"({os.cpu_count()} CPU cores)")
    for col in ("engine", "round 1 (s)", "median round 2+ (s)", "kB sent / received per site per round (median)",
                "MB per site, whole run", "val NDCG@10 (deployed: the sites' DP-noised sums)"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        per_round, wire = r.get("wire-bytes-per-round"), r.get("wire-bytes")
        kb = "—" if not per_round else " · ".join(
            f"{statistics.median(w['sent']) / 1e3:.0f} / {statistics.median(w['received']) / 1e3:.0f}"
            for w in per_round.values())
        mb = "—" if not wire else " · ".join(f"{w['sent'] / 1e6:.2f} / {w['received'] / 1e6:.2f}" for w in wire.values())
        table.add_row(name, f"{r['first-round-s']:.1f}", f"{statistics.median(r['round-s']):.1f}", kb, mb,
                      f"{r['final']['val-ndcg@10']:.4f}")
    Console().print(table)
    (args.root / "bench.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
