"""fedrec ServerApp: federated averaging of the LoRA adapter only, with a privacy ledger.

The run: load the base model and the public catalog → start (or resume) the run directory and
its ledger → the DP popularity prior (round 0) → ``num-server-rounds`` rounds of Flower's
strategy loop, each one ``server/rounds.py``'s pipeline around the aggregator chosen at start
(``server/aggregators.py``) → ``summary.json``. The run directory's layout is in
``server/run_dir.py``; the ledger's in ``server/ledger.py``.

With ``central-dp = true`` the server also gives a client-level guarantee (``server/central_dp.py``)
for a federation of ``central-population`` clients; with ``secure-aggregation = true`` it sees
only the sum of the adapters (``server/secure_aggregation.py``).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from pathlib import Path

import flwr
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file

from common.config import Settings, fedrec_home, partition_root
from common.data import catalog_fingerprint, load_movielens, read_catalog, write_catalog
from common.model import (adapter_config, adapter_state, build_model, fingerprint, load_adapter_state, load_encoder,
                          resolve_model_path, sequence_options)
from common.units import ADJACENCY, UNITS, central_unit
from server.aggregators import ServerAdam, choose
from server.central_dp import CentralDP
from server.ledger import Ledger
from server.prior import popularity_prior
from server.records import RoundRecord
from server.replies import Names
from server.rounds import RoundPipeline, wait_for_nodes
from server.run_dir import SERVER_OPTIMIZER, RunDirectory, RunStopped
from server.secure_aggregation import SecureGrid

app = ServerApp()
log = logging.getLogger("fedrec.server")


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    s = Settings.from_run_config(dict(context.run_config))
    run_config = dict(context.run_config)
    catalog = read_catalog(s.catalog) if s.catalog else load_movielens(s.dataset or None)[0]
    model, checks = global_model(s, len(catalog))
    checks["catalog-sha256"] = catalog_fingerprint(catalog)
    run = RunDirectory(Path(s.run_dir).expanduser() if s.run_dir else fedrec_home() / "runs" / f"run-{context.run_id}",
                       model)
    run.path.mkdir(parents=True, exist_ok=True)
    resumed_from, resume = run.resume_point(run_config, checks) if s.resume else (None, {})
    if not s.resume:
        start_run_directory(run, catalog, run_config, s, checks)
    ledger = Ledger(run.path / "ledger.sqlite")
    num_nodes = len(wait_for_nodes(grid, s.min_train_nodes))
    s.check_population(num_nodes)  # central DP: the declared federation size, not whoever connected first
    aggregator = choose(s, s.central_population if s.central_dp else num_nodes)
    write_ledger_meta(ledger, run_config, s, aggregator, checks)
    record = RoundRecord(ledger, s.accountant)
    names = Names(ledger.meta("pseudonym-key"))
    # Simulations leave the popularity baseline of their split here; deployments have none.
    strategy = RoundPipeline(aggregator, run, record, s, names, resumed_from or 0,
                             partition_root(s, num_nodes) / "reference.json")
    if s.secure_aggregation:
        grid = SecureGrid(grid, context, SecAggPlusWorkflow(
            whole_or_fraction(s.secagg_num_shares), whole_or_fraction(s.secagg_reconstruction_threshold),
            # Under distributed noise every site weighs 1 (its noisy gradient, not its example count).
            max_weight=1.0 if s.distributed_noise else s.secagg_max_weight, clipping_range=s.secagg_clipping_range))
    if resumed_from is not None:
        folder = run.path / "adapters" / f"round-{resumed_from:03d}"
        load_adapter_state(model, load_file(folder / "adapter_model.safetensors"))
        if isinstance(aggregator, ServerAdam) and (folder / SERVER_OPTIMIZER).is_file():
            aggregator.load_state_dict(torch.load(folder / SERVER_OPTIMIZER))
        strategy.started = time.time() - resume["elapsed-s"]  # elapsed-s carries on from the last row
        with open(run.path / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"at": time.time(), "from-round": resumed_from, **resume,
                                "restore-s": round(time.time() - started, 3)}) + "\n")
        log.warning("resumed %s from round %s (restored in %.1f s)", run.path, resumed_from, time.time() - started)
    elif s.popularity_prior:
        central = aggregator.strategy.mechanism if isinstance(aggregator.strategy, CentralDP) else None
        strategy.exhausted |= popularity_prior(grid, model, checks, s, run, record, names, central)
    else:
        run.checkpoint(0, ArrayRecord(adapter_state(model)))
    stopped = None
    try:
        if (resumed_from or 0) >= s.num_server_rounds:
            raise RunStopped(f"resume: all {s.num_server_rounds} rounds are committed already")
        strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(model)),
                       num_rounds=s.num_server_rounds - (resumed_from or 0), timeout=s.round_timeout,
                       train_config=ConfigRecord(checks), evaluate_config=ConfigRecord(checks))
    except RunStopped as e:
        stopped = str(e)
        log.warning("run stopped: %s", stopped)
    finally:
        ledger.close()
    run.write_summary(num_nodes, stopped)


def global_model(s: Settings, num_items: int):
    """The PEFT model the global adapter lives in, and the base model's fingerprint."""
    encoder, _ = load_encoder(s.model, s.model_layers)
    checks = {"base-sha256": fingerprint(encoder)}  # before LoRA is injected into it
    model = build_model(encoder, num_items, adapter_config(s, encoder), seed=s.seed, init_scale=s.initial_score_scale,
                        prefix_cache_mb=s.prefix_cache_mb, frozen_precision=s.frozen_precision, **sequence_options(s))
    model.peft_config["default"].base_model_name_or_path = str(resolve_model_path(s.model))
    return model, checks


def start_run_directory(run: RunDirectory, catalog, run_config: dict, s: Settings, checks: dict) -> None:
    write_catalog(catalog, run.path / "catalog.csv")
    (run.path / "config.json").write_text(json.dumps({
        "run-config": run_config, **checks, "num-items": len(catalog), "flwr": flwr.__version__,
        "privacy-unit": UNITS[s.privacy_unit] if s.dp else "none (dp = false)",
        "central-privacy-unit": central_unit(s.partition) if s.central_dp else "none (central-dp = false)",
    }, indent=1))
    run.metrics.unlink(missing_ok=True)
    (run.path / "ledger.sqlite").unlink(missing_ok=True)


def write_ledger_meta(ledger: Ledger, run_config: dict, s: Settings, aggregator, checks: dict) -> None:
    """The ledger's header. INSERT OR IGNORE: a resumed run keeps its first start's values (its
    pseudonym key too), and its central-DP accountant composes the releases already committed."""
    ledger.set_meta(**{"run-config": run_config, "unit": UNITS[s.privacy_unit] if s.dp else "none (dp = false)",
                       "privacy-unit": s.privacy_unit, "adjacency": ADJACENCY[s.privacy_unit],
                       "accountant": s.accountant, "pseudonym-key": secrets.token_hex(16), **checks})
    if isinstance(aggregator.strategy, CentralDP):
        mechanism = aggregator.strategy.mechanism
        ledger.set_meta(**{"central-unit": central_unit(s.partition), "central-population": mechanism.population,
                           "central-expected-clients": mechanism.expected_clients})
        for sigma, q, _ in ledger.releases("server"):
            mechanism.compose(sigma, q)


def whole_or_fraction(x: float) -> int | float:
    """SecAggPlusWorkflow reads an int as a count and a float as a fraction of the clients."""
    return int(x) if x > 1 else x
