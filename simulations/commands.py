"""The simulator's command: ``fedrec simulate``, the App under Flower's simulation engine.

    fedrec simulate [--rounds N] [--clients K] [--run-dir DIR] [--set key=value ...] [--scenario P:B ...] [--test]
    fedrec simulate --resume RUN_DIR

Every round is scored on the validation split, which is what choices are made on. ``--test``
(run config ``evaluate-test``) also scores the last round on the test split: that is for a
final configuration, fixed before the run, and the summary says the test split was read.

It checks every setting against the model and the data, writes the simulated sites' folders
(simulations/partition.py), runs the App (simulations/engine.py) with a progress bar, and
prints the results and the privacy statement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import statistics
import threading
import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.cli import console, fail


def register(commands) -> None:
    p = commands.add_parser("simulate", help="run a federated simulation with Flower's simulation engine")
    p.add_argument("--rounds", type=int, help="num-server-rounds")
    p.add_argument("--clients", type=int, help="number of simulated clients (default: 10 silos, or one per user)")
    p.add_argument("--run-dir", help="where results go (default: runs/<timestamp>)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides (pyproject keys)")
    p.add_argument("--verbose", action="store_true", help="show Flower's logs instead of a progress bar")
    p.add_argument("--scenario", nargs="*", default=[], metavar="PARTITION:BEHAVIOUR",
                   help="make simulated clients misbehave, e.g. 0:sign-flip 1:nan (simulations/scenarios.py)")
    p.add_argument("--test", action="store_true",
                   help="also score the last round on the test split (a final configuration's run; evaluate-test)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a killed simulation from its last committed round, with its own settings")
    p.set_defaults(func=simulate)


# --- simulate -------------------------------------------------------------------------------

DEFAULT_SILOS = 10  # as options.num-supernodes of the local-simulation federation in pyproject.toml


def count_users(s) -> int:
    from common.data import load_movielens
    from simulations.partition import select_users

    return len(select_users(load_movielens(s.dataset or None)[1], s.max_users, s.seed))


def simulate(args) -> int:
    """Check everything, write the sites' data, run the App with a progress bar, report."""
    run_dir, overrides, s, clients = plan(args)
    from simulations.engine import log_flower_to

    log_flower_to(run_dir / "flower.log", args.verbose)
    if args.resume:
        console.print(f"fedrec: resuming {run_dir} after round {len(_rows(run_dir / 'metrics.jsonl'))}")
    console.print(f"fedrec: {clients} clients ({s.partition}{', skew α=' + str(s.skew_alpha) if s.skew_alpha else ''}), "
                  f"{s.num_server_rounds} rounds, run directory [bold]{run_dir}[/bold]")
    started = time.time()
    stop = threading.Event()
    watcher = threading.Thread(target=_progress, daemon=True, args=(
        run_dir / "metrics.jsonl", s.num_server_rounds, stop, s.accountant, s.privacy_unit))
    watcher.start()
    try:
        run(overrides, clients, args.scenario, args.verbose)
    finally:
        stop.set()
        watcher.join()
    report(run_dir, s, clients, time.time() - started)
    return 0


def plan(args):
    """(run dir, overrides, settings, clients): every setting checked against the model, the data
    and the federation, and the sites' data written, before anything runs."""
    from common.config import ConfigError, Settings, defaults, parse_overrides
    from common.data import DataError, load_movielens, read_catalog
    from common.model import check_model_settings
    from simulations.partition import materialize
    from simulations.scenarios import parse as parse_scenario

    if args.resume:
        run_dir, overrides, args.clients, args.scenario = resume_plan(args)
    else:
        try:
            overrides = parse_overrides(args.set)
        except ConfigError as e:
            fail(str(e))
        if args.rounds is not None:
            overrides["num-server-rounds"] = args.rounds
        if args.test:
            overrides["evaluate-test"] = True
        run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
        overrides["run-dir"] = str(run_dir)
    try:
        s = Settings.from_run_config({**defaults(), **overrides})
        check_model_settings(s)  # a wrong model folder, depth or LoRA target fails here, not in every client
        if s.dataset:
            load_movielens(s.dataset)
        if s.catalog:
            read_catalog(s.catalog)
        if args.clients is not None and args.clients < 1:
            raise ValueError(f"--clients {args.clients}: need at least 1")
        users = count_users(s) if s.partition == "user" else None
        clients = args.clients or users or DEFAULT_SILOS
        if users is not None and clients != users:
            raise ValueError(f"partition=user needs one client per user: {users} users, {clients} clients")
        if s.central_dp and "central-population" not in overrides:  # the simulated federation is all there is
            overrides["central-population"] = clients
            s = dataclasses.replace(s, central_population=clients)
        s.check_population(clients)
        if (partitions := parse_scenario(args.scenario)) and max(partitions) >= clients:
            raise ValueError(f"--scenario: partitions are 0..{clients - 1}, got {max(partitions)}")
        if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"--run-dir {run_dir} exists and is not empty; choose a new folder, or --resume it")
        overrides["partition-dir"] = str(materialize(s, clients))  # the users produce their data first
    except (ConfigError, DataError, ValueError) as e:
        fail(str(e))
    if not args.resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        # What --resume needs to start the same simulation again.
        (run_dir / SIMULATION_FILE).write_text(json.dumps(
            {"clients": clients, "scenario": args.scenario, "overrides": overrides}, indent=1))
    return run_dir, overrides, s, clients


def run(overrides: dict, clients: int, scenario: list[str], verbose: bool) -> None:
    """The App on Flower's simulation engine; misbehaving clients run simulations/scenarios.py's ClientApp.
    Client workers' own output stays in Ray's logs unless ``verbose``."""
    from simulations.engine import run_app
    from simulations.scenarios import ENV

    if not scenario:
        return run_app(overrides, clients, worker_logs=verbose)
    env = {ENV: " ".join(scenario), **{k: v for k, v in os.environ.items() if k.startswith(ENV)}}
    run_app(overrides, clients, worker_logs=verbose, client_app="simulations.scenarios:app", env=env)


def report(run_dir: Path, s, clients: int, wall: float) -> None:
    """summary.json with the wall time and the clients' final ε, the results table, the privacy statement."""
    rows = _rows(run_dir / "metrics.jsonl")
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if len(rows) < s.num_server_rounds and "stopped" not in summary:
        fail(f"the run ended after {len(rows)} of {s.num_server_rounds} rounds; see {run_dir / 'flower.log'}")
    summary["wall-s"] = round(wall, 1)
    if s.dp and (final := list(final_epsilons(run_dir, rows).values())):
        summary.update({"client-epsilon-max": max(final), "client-epsilon-median": statistics.median(final),
                        "delta": s.delta, "accountant": s.accountant})
    summary_file.write_text(json.dumps(summary, indent=1))
    if rows:
        print_summary(rows, s, clients, wall, run_dir)
    if "stopped" in summary:
        console.print(f"[yellow]The run stopped after {len(rows)} of {s.num_server_rounds} rounds: "
                      f"{summary['stopped']}[/yellow]")


SIMULATION_FILE = "simulation.json"


def resume_plan(args) -> tuple[Path, dict, int, list[str]]:
    """(run dir, overrides, clients, scenario) to start a killed simulation again: its own."""
    from safetensors.torch import load_file

    from common.config import defaults
    from server.ledger import Ledger

    if args.rounds is not None or args.clients is not None or args.set or args.run_dir or args.scenario or args.test:
        fail("--resume takes no --rounds, --clients, --set, --run-dir, --scenario or --test: a run resumes with its own")
    run_dir = Path(args.resume).resolve()
    plan_file = run_dir / SIMULATION_FILE
    if not plan_file.is_file():
        fail(f"--resume {run_dir}: no {SIMULATION_FILE}; only runs started by `fedrec simulate` resume this way "
             "(a deployment resumes with flwr run --run-config 'run-dir=\"…\" resume=true')")
    if not (run_dir / "ledger.sqlite").is_file():
        fail(f"--resume {run_dir}: no ledger.sqlite; the run died before it started, start it again")
    try:
        plan = json.loads(plan_file.read_text())
        overrides, clients, scenario = dict(plan["overrides"]), int(plan["clients"]), list(plan["scenario"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        fail(f"{plan_file}: not a fedrec simulation plan ({e})")
    try:
        ledger = Ledger(run_dir / "ledger.sqlite")
        last = ledger.last_round()
        ledger.close()
    except sqlite3.DatabaseError as e:
        fail(f"{run_dir / 'ledger.sqlite'}: not a readable ledger ({e})")
    rounds = overrides.get("num-server-rounds", defaults()["num-server-rounds"])
    if last is not None and last >= rounds:
        fail(f"--resume {run_dir}: all {rounds} rounds are committed; nothing to resume")
    if last is not None:
        adapter = run_dir / "adapters" / f"round-{last:03d}" / "adapter_model.safetensors"
        try:
            load_file(adapter)
        except Exception as e:  # missing, truncated or not safetensors: the run cannot go on from it
            fail(f"{adapter}: the adapter of the last committed round is not readable "
                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return run_dir, {**overrides, "resume": True}, clients, scenario


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _progress(metrics: Path, rounds: int, stop: threading.Event, accountant: str, unit: str) -> None:
    columns = [TextColumn("[bold]round {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training round 1", total=rounds)
        while not stop.is_set():
            rows = _rows(metrics)
            if rows:
                r = rows[-1]
                eps, delta = r.get("epsilon-max"), r.get("delta")
                ndcg = f"validation NDCG@10 {r.get('val-ndcg@10', float('nan')):.4f}"
                progress.update(task, completed=len(rows), description=(
                    f"{ndcg}  client ε max {eps:.2f} at δ = {delta:g} ({unit}-level, {accountant.upper()})"
                    if eps is not None else ndcg))
            stop.wait(1.0)
        progress.update(task, completed=len(_rows(metrics)))


def final_epsilons(run_dir: Path, rows: list[dict]) -> dict:
    """Each client's last reported cumulative ε (from the prior if it never trained)."""
    final = {}
    prior = run_dir / "prior.json"
    if prior.is_file():
        final.update({c["node"]: c["epsilon"] for c in json.loads(prior.read_text())["client-updates"]})
    for row in rows:
        for key in ("client-updates", "client-evaluations"):
            final.update({c["node"]: c["epsilon"] for c in row.get(key, []) if c.get("epsilon") is not None})
    return final


def print_summary(rows: list[dict], s, clients: int, wall: float, run_dir: Path) -> None:
    last = rows[-1]
    table = Table(title=f"fedrec: {len(rows)} rounds, {clients} clients, {wall:.0f} s")
    table.add_column("model")
    table.add_column("split")
    for name in ("HR@10", "NDCG@10", "Recall@20"):
        table.add_column(name, justify="right")
    keys = ("hr@10", "ndcg@10", "recall@20")
    exact = last.get("metrics-source", "").startswith("exact")
    splits = [("validation", "val-")] + ([("test (read once)", "")] if "ndcg@10" in last else [])
    for split, prefix in splits:
        table.add_row("federated global adapter" + (" (exact: simulated sites)" if exact else " (sites' DP releases)"),
                      split, *(f"{last.get(prefix + k, float('nan')):.4f}" for k in keys))
        if exact and s.dp:  # without DP the sites' releases are the exact figures
            table.add_row(f"  the same from the sites' DP releases (noise σ = {last['eval-noise-std-per-sum']:.0f} "
                          "per site sum)", split, *(f"{last.get('dp-' + prefix + k, float('nan')):.4f}" for k in keys))
        if f"popularity-{prefix}hr@10" in last:
            table.add_row("popularity", split, *(f"{last[f'popularity-{prefix}{k}']:.4f}" for k in keys))
    console.print(table)
    final = final_epsilons(run_dir, rows)
    if s.dp and final:
        from client.secure_aggregation import QUANTIZATION_SLACK_MAX
        from common.units import UNITS

        values = list(final.values())
        released = ([f"the popularity histogram (Gaussian, σ_h = {s.prior_noise_multiplier:g})"]
                    if s.popularity_prior else []) + [
            f"every adapter (DP-SGD: Poisson rate q = batch-size / declared-{s.privacy_unit}s, σ = "
            f"{s.noise_multiplier:g}, C = {s.max_grad_norm:g})"] + ([
            "under distributed-noise, σ and σ_h are the noise of SecAgg+'s sums: each site added σ/√T and "
            "σ_h/√T (T its threshold), so that ε holds only against a server that follows the protocol with at "
            "least T sites in each sum (its own share alone carries σ/√T: the site's releases.jsonl records "
            "both); δ is the Gaussian sum's "
            "plus what SecAgg+'s rounding of each share adds, (1 + e^ε)·Σ τ, each site's τ at most "
            f"{QUANTIZATION_SLACK_MAX:g} a round (`fedrec client audit` prints the exact sum)"]
            if s.distributed_noise else [f"every {s.privacy_unit} count (Gaussian, σ_n = {s.count_noise_multiplier:g})"]) + [
            f"every evaluation (Gaussian on 4 sums per split scored, sensitivity √(4·splits), "
            f"σ_e = {s.eval_noise_multiplier:g})"]
        # SecAgg+'s rounding of the shares (client/secure_aggregation.py): each site's τ ≤ the maximum a
        # share, one share a round and one for the prior.
        shares = s.num_server_rounds + (1 if s.popularity_prior else 0)
        rounding_bound = (1 + math.exp(min(max(values), 700))) * shares * QUANTIZATION_SLACK_MAX
        rounding = f" + at most {rounding_bound:.1g}" if s.distributed_noise else ""
        console.print(
            f"Privacy: client ε max {max(values):.3f}, median {statistics.median(values):.3f} over all {len(values)} "
            f"clients at δ = {s.delta:g}{rounding}, {UNITS[s.privacy_unit]}, Opacus {s.accountant.upper()} accountant. "
            "It covers "
            f"everything the sites released, composed: {'; '.join(released)}; the rest of every reply is public "
            "(common/releases.py). Each simulated site is fresh for this run (a deployed site's accountant spans "
            "all its runs). Simulated sites also sent exact metrics: their data is the simulator's, not private.")
    else:
        console.print("[yellow]Site-level privacy: none — clients trained without DP-SGD (dp = false); their "
                      "evaluation figures are exact.[/yellow]")
    if s.central_dp and last.get("central-epsilon") is not None:
        from common.units import central_unit

        q = s.expected_clients(clients) / clients
        prior = (f"the popularity prior (unit-norm histograms, σ_h = {s.prior_noise_multiplier:g}) and "
                 if s.popularity_prior else "")
        console.print(
            f"Client-level privacy (server, a separate guarantee, not added to the one above): ε = "
            f"{last['central-epsilon']:.3f} at δ = {s.central_delta:g} for {prior}the global adapters of all "
            f"{len(rows)} rounds ({central_unit(s.partition)}; Poisson client sampling q = {q:.3g}, updates clipped "
            f"to C = {s.central_clipping_norm:g}, Gaussian noise z = {s.central_noise_multiplier:g}; Flower "
            "RdpAccountant). The server sees each update and is trusted to add the noise.")
    failed, rejected = sum(r.get("failures", 0) for r in rows), sum(r.get("rejected", 0) for r in rows)
    if failed or rejected:
        console.print(f"[yellow]Dropped replies over the run: {failed} failed (crash, timeout), {rejected} rejected "
                      "by the update checks; each reason is in metrics.jsonl and the ledger.[/yellow]")
    if "ndcg@10" not in last:
        console.print("Scored on the validation split only; `--test` scores a final configuration's last round on "
                      "the test split.")
    console.print(f"Run directory: {run_dir} (metrics.jsonl, adapters/round-NNN, summary.json)")
