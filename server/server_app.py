"""fedrec ServerApp: FedAvg over the LoRA adapter only, and the run directory.

The run directory (``run-dir``, default ``$FEDREC_HOME/runs/run-<run id>``) holds

    config.json          the resolved run config, base-model and catalog SHA-256
    catalog.csv          the public catalog the scores index into
    adapters/round-NNN/  the global adapter after round NNN (000 = initial), PEFT format
    metrics.jsonl        one JSON object per round (machine-readable)
    prior.json           the DP popularity prior: who answered, their ε after it
    summary.json         the last round's figures, written when the run ends
"""

from __future__ import annotations

import json
import math
import logging
import shutil
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import flwr
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from common.config import Settings, fedrec_home, partition_root
from common.data import catalog_fingerprint, load_movielens, read_catalog, write_catalog
from common.model import (adapter_state, build_model, fingerprint, load_adapter_state, load_encoder, lora_config,
                          resolve_model_path, set_item_bias)
from common.privacy import UNIT

app = ServerApp()
log = logging.getLogger("fedrec.server")


class RunRecorder(FedAvg):
    """Flower's FedAvg, plus writing each round's adapter and metrics to the run directory."""

    def __init__(self, run_dir: Path, model, settings: Settings, reference_path: Path | None, **kwargs):
        super().__init__(**kwargs)
        self.run_dir, self.model, self.settings = run_dir, model, settings
        self.reference_path = reference_path
        self.started = time.time()
        self.row: dict = {}

    def save_adapter(self, server_round: int, arrays: ArrayRecord) -> None:
        load_adapter_state(self.model, arrays.to_torch_state_dict())
        target = self.run_dir / "adapters" / f"round-{server_round:03d}"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        clients = []
        for msg in replies:
            if msg.has_error():
                clients.append({"node": msg.metadata.src_node_id, "error": msg.error.reason})
                continue
            clients.append({"node": msg.metadata.src_node_id, **json_metrics(msg.content["metrics"])})
        ok = [c for c in clients if "error" not in c]
        eps = [c["epsilon"] for c in ok if c["epsilon"] is not None]
        self.row = {
            "round": server_round,
            "clients": len(ok),
            "failures": len(clients) - len(ok),
            "train-loss": metrics["train-loss"] if metrics else None,
            "epsilon-max": max(eps) if eps else None,
            "epsilon-median": statistics.median(eps) if eps else None,
            "delta": self.settings.delta if self.settings.dp else None,
            "client-updates": clients,
        }
        if arrays is not None:
            self.save_adapter(server_round, arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        row = {"round": server_round, **self.row}
        if metrics is not None:
            # Weighted by each client's user count, the mean is exact over all evaluated users.
            row.update({k: metrics[k] for k in metrics if k != "num-examples"})
            row["eval-users"] = sum(int(m.content["metrics"]["num-examples"]) for m in replies if not m.has_error())
        if self.reference_path and self.reference_path.is_file():
            popularity = json.loads(self.reference_path.read_text())["test"]
            row.update({f"popularity-{k}": v for k, v in popularity.items()})
        row["elapsed-s"] = round(time.time() - self.started, 2)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.row = {}
        return metrics


def json_metrics(record: MetricRecord) -> dict:
    """A client's metrics for the run directory. Without DP a client reports ε = inf ("no
    guarantee"); JSON has no inf, so it becomes null."""
    return {k: (v if math.isfinite(v) else None) for k, v in record.items()}


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Training metrics across clients: example-weighted loss, and ε as a maximum, never a mean
    (an average ε is no one's guarantee)."""
    metrics = [r["metrics"] for r in replies]
    examples = sum(m[weight_key] for m in metrics)
    return MetricRecord({
        weight_key: examples,
        "train-loss": sum(m["train-loss"] * m[weight_key] for m in metrics) / max(examples, 1),
        "epsilon-max": max(m["epsilon"] for m in metrics),
        "delta": max(m["delta"] for m in metrics),
    })


def popularity_prior(grid: Grid, model, checks: dict, s: Settings, run_dir: Path) -> None:
    """Set the item bias to log(1 + Σ noisy client counts): a DP popularity prior.

    Each client answers with a Gaussian-noised histogram of its training targets (its own
    accountant records the release); the server only sums them and clamps at zero, which is
    post-processing. Under DP noise, learning this bias by DP-SGD alone takes far more steps.
    """
    nodes = wait_for_nodes(grid, s.min_train_nodes)
    messages = [Message(RecordDict({"config": ConfigRecord(checks)}), dst_node_id=node,
                        message_type="query.popularity") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=600))
    ok = [r for r in replies if not r.has_error()]
    record = {"asked": len(nodes), "answered": len(ok), "noise-multiplier": s.prior_noise_multiplier if s.dp else 0.0,
              "errors": [r.error.reason for r in replies if r.has_error()],
              "client-updates": [{"node": r.metadata.src_node_id, **json_metrics(r.content["metrics"])} for r in ok]}
    (run_dir / "prior.json").write_text(json.dumps(record, indent=1))
    if not ok:
        log.warning("popularity prior: no client answered; starting from a zero bias")
        return
    set_item_bias(model, sum(r.content["arrays"].to_torch_state_dict()["counts"] for r in ok))


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum and time.time() < deadline:
        time.sleep(1)
    return nodes


def load_catalog(s: Settings):
    return read_catalog(s.catalog) if s.catalog else load_movielens(s.dataset or None)[0]


@app.main()
def main(grid: Grid, context: Context) -> None:
    s = Settings.from_run_config(dict(context.run_config))
    run_dir = Path(s.run_dir).expanduser() if s.run_dir else fedrec_home() / "runs" / f"run-{context.run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(s)
    encoder, _ = load_encoder(s.model, s.model_layers)
    base_sha = fingerprint(encoder)
    model = build_model(encoder, len(catalog), lora_config(s.lora_rank, s.lora_alpha, s.lora_targets), seed=s.seed,
                        init_scale=s.initial_score_scale)
    model.peft_config["default"].base_model_name_or_path = str(resolve_model_path(s.model))
    checks = {"base-sha256": base_sha, "catalog-sha256": catalog_fingerprint(catalog)}
    write_catalog(catalog, run_dir / "catalog.csv")
    (run_dir / "config.json").write_text(json.dumps({
        "run-config": dict(context.run_config), **checks, "num-items": len(catalog),
        "flwr": flwr.__version__, "privacy-unit": UNIT if s.dp else "none (dp = false)",
    }, indent=1))
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    num_nodes = len(list(grid.get_node_ids()))
    # Simulations leave the popularity baseline of their split here; deployments have none.
    reference = partition_root(s, num_nodes) / "reference.json"
    strategy = RunRecorder(
        run_dir, model, s, reference,
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=min(s.min_train_nodes, max(1, num_nodes)),
        min_available_nodes=s.min_train_nodes,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    if s.popularity_prior:
        popularity_prior(grid, model, checks, s, run_dir)
    initial = ArrayRecord(adapter_state(model))
    strategy.save_adapter(0, initial)
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=s.num_server_rounds,
        train_config=ConfigRecord(checks),
        evaluate_config=ConfigRecord(checks),
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = {k: v for k, v in rows[-1].items() if k != "client-updates"} if rows else {}
    summary.update({"rounds": len(rows), "run-dir": str(run_dir), "nodes": num_nodes})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
