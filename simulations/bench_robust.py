"""Robust aggregation under attack: the clean run, then the same with adversarial clients.

    python -m simulations.bench_robust --clients 5 --attackers 4:sign-flip --rounds 3

Runs ``fedrec simulate`` (real Flower simulation, real model and data) once without attackers
(FedAvg) and then, with the listed partitions misbehaving (``simulations/scenarios.py``), once
per aggregator. ``max-update-norm`` is raised so that the update validation does not catch the
attackers: the table measures the aggregators alone. Prints NDCG@10 and HR@10 of each run and
its ratio to the clean run, and writes ``robust.json`` in ``--root``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

AGGREGATORS = ("fedavg", "median", "trimmed-mean", "multi-krum")


def run(root: Path, name: str, clients: int, rounds: int, settings: list[str], scenario: list[str]) -> dict:
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--clients", str(clients), "--rounds", str(rounds),
           "--run-dir", str(root / name), "--set", *settings]
    if scenario:
        cmd += ["--scenario", *scenario]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FEDREC_HOME": str(root / "home")})
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return {"val-ndcg@10": rows[-1]["val-ndcg@10"], "val-hr@10": rows[-1]["val-hr@10"],
            "popularity-val-ndcg@10": rows[-1].get("popularity-val-ndcg@10"),
            "curve": [r["val-ndcg@10"] for r in rows]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attackers", nargs="*", default=["4:sign-flip"], metavar="PARTITION:BEHAVIOUR")
    parser.add_argument("--aggregators", nargs="*", default=list(AGGREGATORS))
    parser.add_argument("--root", type=Path, default=Path(f"/tmp/fedrec-robust-{time.strftime('%Y%m%d-%H%M%S')}"))
    parser.add_argument("--set", nargs="*", default=["dp=false", "local-steps=10", "batch-size=32"],
                        metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    settings = [*args.set, "max-update-norm=1e9"]
    krum = [f"krum-malicious={len(args.attackers)}"]
    results = {"clean, fedavg": run(args.root, "clean", args.clients, args.rounds, settings, [])}
    for aggregation in args.aggregators:
        results[f"attacked, {aggregation}"] = run(args.root, f"attacked-{aggregation}", args.clients, args.rounds,
                                                  [*settings, f"aggregation={aggregation}", *krum], args.attackers)
    clean = results["clean, fedavg"]["val-ndcg@10"]
    table = Table(title=f"{args.clients} clients, attackers {' '.join(args.attackers)}, {args.rounds} rounds, "
                        f"{' '.join(args.set)}")
    for col in ("run", "val NDCG@10", "vs clean", "val HR@10", "val NDCG@10 by round"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['val-ndcg@10']:.4f}", f"{r['val-ndcg@10'] / clean:.0%}", f"{r['val-hr@10']:.4f}",
                      " ".join(f"{v:.4f}" for v in r["curve"]))
    Console().print(table)
    popularity = results["clean, fedavg"]["popularity-val-ndcg@10"]
    if popularity is not None:
        Console().print(f"popularity validation NDCG@10 on the same split: {popularity:.4f}")
    (args.root / "robust.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
