"""fedrec ClientApp: DP-LoRA training and evaluation on this node's private data.

Node config (``flower-supernode --node-config``):

* ``data-dir``  folder with this client's ``interactions.csv`` (see ``common/data.py``)
* ``catalog``   the public ``catalog.csv`` (default: in ``data-dir``, else its parent)
* ``state-dir`` where the privacy accountant persists (default: ``data-dir/state``)
* ``epsilon-max``, ``delta``  this client's privacy budget (else ``data-dir/budget.json``);
  the client declines any round that would take its ε past it, whatever the server asks

In simulation, nodes have ``partition-id``/``num-partitions`` instead, and the client
reads ``<partition-dir>/client-<id>``, written by ``simulations.partition``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_aggregation import secure_aggregation_mod
from client.train import evaluate as evaluate_local
from client.train import sample_rate
from client.train import train as train_local
from common.config import Settings
from common.data import catalog_fingerprint, leave_last_out, read_catalog, read_interactions
from common.model import (adapter_config, adapter_state, build_model, fingerprint, load_adapter_state, load_encoder,
                          refresh_item_embeddings)
from common.metrics import item_counts
from common.privacy import (UNIT, Budget, client_id, epsilon, history_metrics, load_history, read_budget,
                            save_history, spend)

app = ClientApp(mods=[secure_aggregation_mod])  # a no-op unless the round is a SecAgg+ round


def data_paths(context: Context, s: Settings) -> tuple[Path, Path, Path]:
    """(data dir, catalog file, state dir) of this node."""
    node = context.node_config
    if "data-dir" in node:
        data_dir = Path(str(node["data-dir"])).expanduser()
    else:  # simulation: this node plays partition `partition-id`
        from simulations.partition import materialize

        root = materialize(s, int(node["num-partitions"]))
        data_dir = root / f"client-{int(node['partition-id'])}"
    if "catalog" in node:
        catalog = Path(str(node["catalog"])).expanduser()
    else:
        catalog = data_dir / "catalog.csv"
        catalog = catalog if catalog.is_file() else data_dir.parent / "catalog.csv"
    if "state-dir" in node:
        state_dir = Path(str(node["state-dir"])).expanduser()
    else:
        run_key = Path(s.run_dir).name if s.run_dir else f"run-{context.run_id}"
        state_dir = data_dir / "state" / run_key
    return data_dir, catalog, state_dir


@lru_cache(maxsize=4)
def load_data(data_dir: Path, catalog_path: Path, history_len: int):
    """Read and split this node's data once per process (it does not change during a run)."""
    catalog = read_catalog(catalog_path)
    users = read_interactions(data_dir, catalog)
    train, valid, test = leave_last_out(users, catalog, history_len)
    return catalog, train, valid, test


_MODELS: dict = {}
MODEL_LOADS = 0  # how many times this process loaded the base model (once per config)


def load_model(s: Settings, num_items: int):
    """The base model is loaded once per process and reused across rounds."""
    global MODEL_LOADS
    key = (s.model, s.model_layers, s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_layers, num_items)
    if key not in _MODELS:
        encoder, tokenizer = load_encoder(s.model, s.model_layers)
        base_sha = fingerprint(encoder)  # before LoRA is injected into it
        model = build_model(encoder, num_items, adapter_config(s, encoder))
        _MODELS[key] = {"model": model, "tokenizer": tokenizer, "base-sha256": base_sha, "items-of": None}
        MODEL_LOADS += 1
    return _MODELS[key]


def settings_and_budget(context: Context) -> tuple[Settings, Budget, Path, Path, Path]:
    """The run's settings with δ replaced by this client's own, its budget, and its paths."""
    s = Settings.from_run_config(dict(context.run_config))
    data_dir, catalog_path, state_dir = data_paths(context, s)
    budget = read_budget(data_dir, dict(context.node_config))
    return dataclasses.replace(s, delta=budget.delta), budget, data_dir, catalog_path, state_dir


def identity(state_dir: Path, history) -> dict:
    """What every reply carries besides its result: this client's id and accountant history."""
    return {"client-id": client_id(state_dir), **history_metrics(history)}


def decline(msg: Message, reason: str, eps_now: float, budget: Budget, state_dir: Path, history) -> Message:
    """A reply that carries no update: the client refused this round, and says why."""
    metrics = MetricRecord({"declined": 1, "epsilon": eps_now, "delta": budget.delta,
                            "epsilon-max": budget.epsilon_max, **identity(state_dir, history)})
    return Message(RecordDict({"metrics": metrics, "decline": ConfigRecord({"reason": reason})}), reply_to=msg)


def check_budget(s: Settings, budget: Budget, history, mechanism) -> str | None:
    """Why this client must refuse to run ``mechanism`` (σ, q, steps), or None if it can."""
    if not s.dp:
        if math.isfinite(budget.epsilon_max):
            return (f"budget: this run trains with dp = false, which this client's budget "
                    f"(ε ≤ {budget.epsilon_max:g} at δ = {budget.delta:g}, {budget.source}) does not allow")
        return None
    affordable, after = spend(history, mechanism, budget, s.accountant)
    if affordable:
        return None
    return (f"budget: this round would take ε from {epsilon(history, budget.delta, s.accountant):.3f} to "
            f"{after:.3f}, over epsilon-max {budget.epsilon_max:g} at δ = {budget.delta:g} "
            f"({UNIT}, Opacus {s.accountant.upper()} accountant; {budget.source})")


def prepare(msg: Message, context: Context):
    """Settings, budget, data, and the model with the received global adapter applied."""
    s, budget, data_dir, catalog_path, state_dir = settings_and_budget(context)
    catalog, train, valid, test = load_data(data_dir, catalog_path, s.history_len)
    entry = load_model(s, len(catalog))
    config = msg.content["config"]
    if config.get("base-sha256") and config["base-sha256"] != entry["base-sha256"]:
        raise RuntimeError("base model differs from the server's (base-sha256 mismatch)")
    if config.get("catalog-sha256") and config["catalog-sha256"] != catalog_fingerprint(catalog):
        raise RuntimeError(f"{catalog_path}: catalog differs from the server's (catalog-sha256 mismatch)")
    state = msg.content["arrays"].to_torch_state_dict()
    model, tokenizer = entry["model"], entry["tokenizer"]
    load_adapter_state(model, state)
    # Item embeddings depend only on the adapter and the public catalog: compute them once
    # per distinct global adapter in this process.
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for _, t in sorted(state.items()))).hexdigest()
    if entry["items-of"] != digest:
        refresh_item_embeddings(model, tokenizer, catalog.texts())
        entry["items-of"] = digest
    return s, budget, state_dir, model, tokenizer, train, valid, test


@app.train()
def train(msg: Message, context: Context) -> Message:
    s, budget, state_dir, model, tokenizer, train_examples, _, _ = prepare(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    history = load_history(state_dir)
    mechanism = (s.noise_multiplier, sample_rate(len(train_examples), s.batch_size), s.local_steps)
    if reason := check_budget(s, budget, history, mechanism):
        return decline(msg, reason, epsilon(history, s.delta, s.accountant), budget, state_dir, history)
    # A simulated client is its partition, whatever node id it got this run.
    node = int(context.node_config.get("partition-id", context.node_id))
    seed = s.seed * 1_000_003 + server_round * 7919 + node % 100_003
    result = train_local(model, tokenizer, train_examples, s, history, seed)
    if s.dp:
        save_history(state_dir, result.history, s.accountant, s.delta)
        history = result.history
    metrics = {
        "num-examples": len(train_examples),
        "train-loss": result.loss,
        "epsilon": result.epsilon,
        "delta": s.delta,
        "steps": result.steps,
        "sample-rate": result.sample_rate,
        "noise-multiplier": s.noise_multiplier if s.dp else 0.0,
        "max-grad-norm": s.max_grad_norm,
        "epsilon-max": budget.epsilon_max,
        "declined": 0,
        **identity(state_dir, history),
    }
    content = RecordDict({"arrays": ArrayRecord(adapter_state(model)), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query("popularity")
def popularity(msg: Message, context: Context) -> Message:
    """A noisy histogram of this client's training targets, for the global popularity prior.

    Gaussian mechanism: adding or removing one training example changes one count by 1
    (L2 sensitivity 1), and N(0, σ_h²) noise is added to every count. That is the sampled
    Gaussian mechanism with q = 1 and one step, so it enters the same accountant history
    as (σ_h, 1.0, 1) and its cost is part of the cumulative ε.
    """
    s, budget, data_dir, catalog_path, state_dir = settings_and_budget(context)
    catalog, train_examples, _, _ = load_data(data_dir, catalog_path, s.history_len)
    history = load_history(state_dir)
    if reason := check_budget(s, budget, history, (s.prior_noise_multiplier, 1.0, 1)):
        return decline(msg, reason, epsilon(history, s.delta, s.accountant), budget, state_dir, history)
    counts = item_counts([ex.target for ex in train_examples], len(catalog))
    if s.dp:
        generator = torch.Generator().manual_seed(secrets.randbits(63))  # secret noise, as in training
        counts += s.prior_noise_multiplier * torch.randn(len(catalog), generator=generator)
        history = history + [(s.prior_noise_multiplier, 1.0, 1)]
        save_history(state_dir, history, s.accountant, s.delta)
    metrics = {"epsilon": epsilon(history, s.delta, s.accountant) if s.dp else math.inf, "delta": s.delta,
               "noise-multiplier": s.prior_noise_multiplier if s.dp else 0.0, "sample-rate": 1.0, "steps": 1,
               "epsilon-max": budget.epsilon_max, "declined": 0, **identity(state_dir, history)}
    content = RecordDict({"arrays": ArrayRecord({"counts": counts}), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    s, _, _, model, tokenizer, _, valid, test = prepare(msg, context)
    metrics = {"num-examples": len(test)}
    metrics.update(evaluate_local(model, tokenizer, test, s.max_length))
    metrics.update({f"val-{k}": v for k, v in evaluate_local(model, tokenizer, valid, s.max_length).items()})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
