"""fedrec ClientApp: DP-LoRA training and evaluation on this node's private data.

Node config (``flower-supernode --node-config``), all of it the site's own:

* ``data-dir``  folder with this client's ``interactions.csv`` (see ``common/data.py``)
* ``catalog``   the public ``catalog.csv`` (default: in ``data-dir``, else its parent)
* ``state-dir`` where the site's privacy accountant lives for the site's lifetime (default:
  ``data-dir/state``). Nothing the server sends (run config, run id, run-dir) moves it, so every
  run composes with all earlier ones; ``fedrec client reset-accountant`` is the only way to start
  a new one, and it is logged there.
* ``epsilon-max``, ``delta``, ``declared-examples``, ``declared-users``, ``privacy-unit``  this
  client's privacy budget, the sizes it makes public and (optionally) the one unit it releases
  at (else ``data-dir/budget.json``); the client declines any request that would take its ε past
  ``epsilon-max``, or mix privacy units in its accountant, whatever the server asks

In simulation, nodes have ``partition-id``/``num-partitions`` instead, and the client
reads ``<partition-dir>/client-<id>``, which the simulator writes before the run starts. A simulated site is
fresh for each simulated run (its state is ``client-<id>/state/<run-dir name>``): the simulator
plays every site, and says so.

Everything a reply carries is listed in ``common/releases.py``; ``check_reply`` refuses to send
anything else. A failure sends the server only a category; the detail stays in
``state-dir/errors.log``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import secrets
import time
import traceback
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.secure_aggregation import (QUANTIZATION_SLACK_MAX, SecureSum, inside_secure_sum, quantization_slack,
                                       secure_aggregation_mod)
from client.train import GradientCanaries, evaluation_sums, privacy_units
from client.train import train as train_local
from common.config import ConfigError, Settings, partition_root
from common.data import DataError, catalog_fingerprint, leave_last_out, read_catalog, read_interactions
from common.model import (adapter_config, adapter_state, build_model, fingerprint, load_adapter_state, load_encoder,
                          prefix_cache, refresh_item_embeddings, sequence_options)
from common.metrics import METRICS, unit_histogram
from common.prefix_cache import save_atomically
from common.privacy import (Budget, BudgetError, client_id, epsilon, history_metrics, load_history,
                            public_sample_rate, read_budget, save_history, spend, unit_conflict)
from common.releases import ERROR_CATEGORIES, EVAL_SPLITS, check_reply, eval_sensitivity
from common.secure_aggregation import HISTOGRAM_UNIT, PRIOR_PHASE
from common.units import UNITS

app = ClientApp(mods=[secure_aggregation_mod])  # a no-op unless the round is a SecAgg+ round


def data_paths(context: Context, s: Settings) -> tuple[Path, Path, Path]:
    """(data dir, catalog file, state dir) of this node."""
    node = context.node_config
    if "data-dir" in node:
        data_dir = Path(str(node["data-dir"])).expanduser()
    else:  # simulation: this node plays partition `partition-id`, written before the run by the simulator
        root = partition_root(s, int(node["num-partitions"]))
        data_dir = root / f"client-{int(node['partition-id'])}"
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: no partition written for this simulation; `fedrec simulate` writes it, "
                            "or `python -m simulations.partition --clients N` before `flwr run .`")
    if "catalog" in node:
        catalog = Path(str(node["catalog"])).expanduser()
    else:
        catalog = data_dir / "catalog.csv"
        catalog = catalog if catalog.is_file() else data_dir.parent / "catalog.csv"
    if "state-dir" in node:
        state_dir = Path(str(node["state-dir"])).expanduser()
    elif "data-dir" in node:  # a site: one accountant for the data's lifetime
        state_dir = data_dir / "state"
    else:  # a simulated site, fresh for each simulated run
        state_dir = data_dir / "state" / (Path(s.run_dir).name if s.run_dir else f"run-{context.run_id}")
    return data_dir, catalog, state_dir


def is_simulated(context: Context) -> bool:
    """A node the simulator plays (its data is the partitioner's, not private)."""
    return "data-dir" not in context.node_config and "partition-id" in context.node_config


class Mismatch(RuntimeError):
    """The server's base model or catalog is not this site's."""


class SiteError(RuntimeError):
    """What a failed request tells the server: a category and no private value."""


def site_errors(handler):
    """Whatever fails, the server learns only a category (common/releases.ERROR_CATEGORIES).

    Exception texts may quote the site's private data (a bad row's values), and Flower sends a
    failed ClientApp's exception text to the server. The full traceback goes to the site's own
    ``errors.log`` instead."""
    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as e:
            category = ("data" if isinstance(e, (DataError, UnicodeDecodeError)) else
                        "budget" if isinstance(e, BudgetError) else
                        "mismatch" if isinstance(e, Mismatch) else
                        "request" if isinstance(e, ConfigError) else "internal")
            logged = log_error(context, msg, category)
            raise SiteError(f"site error ({category}): {ERROR_CATEGORIES[category]}; the details are in the "
                            f"site's errors.log" + ("" if logged else " (which could not be written)")) from None
    return guarded


def log_error(context: Context, msg: Message, category: str) -> bool:
    """Append the current exception's traceback to the site's errors.log (in its state folder)."""
    node = context.node_config
    if "state-dir" in node or "data-dir" in node:
        folder = Path(str(node.get("state-dir") or Path(str(node["data-dir"])) / "state")).expanduser()
    else:  # a simulated site, whose partition may not even exist
        from common.config import fedrec_home

        folder = fedrec_home() / "site-errors"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "errors.log", "a") as f:
            f.write(json.dumps({"at": time.time(), "category": category, "message-type": msg.metadata.message_type,
                                "traceback": traceback.format_exc()}) + "\n")
    except OSError:
        return False
    return True


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
    key = (s.model, s.model_layers, s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_layers, num_items, s.prefix_cache_mb,
           s.frozen_precision, *sequence_options(s).values())
    if key not in _MODELS:
        encoder, tokenizer = load_encoder(s.model, s.model_layers)
        base_sha = fingerprint(encoder)  # before LoRA is injected into it
        model = build_model(encoder, num_items, adapter_config(s, encoder), prefix_cache_mb=s.prefix_cache_mb,
                            frozen_precision=s.frozen_precision, **sequence_options(s))
        _MODELS[key] = {"model": model, "tokenizer": tokenizer, "base-sha256": base_sha, "items-of": None, "key": key}
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
    content = RecordDict({"metrics": metrics, "decline": ConfigRecord({"reason": reason})})
    check_reply("decline", content)
    return Message(content, reply_to=msg)


def check_budget(s: Settings, budget: Budget, state_dir: Path, history, releases: list) -> str | None:
    """Why this client must refuse to make ``releases`` (each (σ, q, steps) at ``privacy-unit``),
    or None if it can."""
    if not s.dp:
        if math.isfinite(budget.epsilon_max):
            return (f"budget: this run trains with dp = false, which this client's budget "
                    f"(ε ≤ {budget.epsilon_max:g} at δ = {budget.delta:g}, {budget.source}) does not allow")
        return None
    if conflict := unit_conflict(s.privacy_unit, budget, state_dir):
        return conflict
    affordable, after = spend(history, releases, budget, s.accountant)
    if affordable:
        return None
    return (f"budget: this round would take ε from {epsilon(history, budget.delta, s.accountant):.3f} to "
            f"{after:.3f}, over epsilon-max {budget.epsilon_max:g} at δ = {budget.delta:g} "
            f"({UNITS[s.privacy_unit]}; Opacus {s.accountant.upper()} accountant; {budget.source})")


def prepare(msg: Message, context: Context):
    """Settings, budget, data, and the model with the received global adapter applied."""
    s, budget, data_dir, catalog_path, state_dir = settings_and_budget(context)
    catalog, train, valid, test = load_data(data_dir, catalog_path, s.history_len)
    entry = load_model(s, len(catalog))
    config = msg.content["config"]
    if config.get("base-sha256") and config["base-sha256"] != entry["base-sha256"]:
        raise Mismatch("base model differs from the server's (base-sha256 mismatch)")
    if config.get("catalog-sha256") and config["catalog-sha256"] != catalog_fingerprint(catalog):
        raise Mismatch(f"{catalog_path}: catalog differs from the server's (catalog-sha256 mismatch)")
    state = msg.content["arrays"].to_torch_state_dict()
    model, tokenizer = entry["model"], entry["tokenizer"]
    load_adapter_state(model, state)
    # Item embeddings depend only on the encoder's LoRA and the public catalog: compute them
    # once per distinct global LoRA in this process (with sequence training, LoRA never moves).
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for n, t in sorted(state.items()) if "lora_" in n)).hexdigest()
    cache = prefix_cache(model, tokenizer)
    if cache and cache.disk is None and not is_simulated(context):
        # Flower 1.41 starts a process per message: a deployed site keeps its users' texts'
        # states for the next one, in its own state folder (as private as its data; never sent).
        # The catalog's are kept apart (site_item_embeddings). A simulated site's worker
        # process keeps them in memory.
        cache.keep_on_disk(state_dir / "prefix-cache" / f"texts-{entry['base-sha256'][:16]}.pt", set(catalog.texts()))
    if entry["items-of"] != digest:
        if is_simulated(context):  # simulated sites share their worker process's memory instead
            refresh_item_embeddings(model, tokenizer, catalog.texts())
        else:
            site_item_embeddings(model, tokenizer, catalog, entry, digest, state_dir / "prefix-cache")
        entry["items-of"] = digest
    return s, budget, state_dir, model, tokenizer, train, valid, test


ITEM_FILES_KEPT = 4  # the last global adapters a site received; the next message needs the newest


def site_item_embeddings(model, tokenizer, catalog, entry: dict, adapter_digest: str, folder: Path) -> None:
    """The catalog's embeddings under the received adapter, kept in the site's state folder.

    Flower 1.41 starts a new ClientApp process per message, and a round's evaluate message and
    the next round's train message carry the same global adapter: the second process reads what
    the first computed. The file holds only public values (the public catalog under the server's
    adapter) and is named by all they depend on: base model, catalog, model shape and the adapter's LoRA. An
    adapter not seen yet is encoded from the catalog's frozen-prefix states, kept beside it."""
    key = repr((entry["base-sha256"], catalog_fingerprint(catalog), entry["key"], adapter_digest))
    path = folder / f"items-{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"
    items = model.get_base_model().item_embeddings
    try:
        saved = torch.load(path, map_location=items.device)
        if saved.shape == items.shape:
            model.get_base_model().set_item_embeddings(saved)
            path.touch()  # recently used: kept
            return
    except Exception:  # missing, or damaged: computed again and rewritten
        pass
    refresh_item_embeddings(model, tokenizer, catalog.texts(), cache_file=folder / f"catalog-{entry['base-sha256'][:16]}.pt")
    save_atomically(items.cpu(), path)
    try:
        for old in sorted(folder.glob("items-*.pt"), key=lambda p: p.stat().st_mtime)[:-ITEM_FILES_KEPT]:
            old.unlink(missing_ok=True)
    except OSError:  # another process of this site pruned first
        pass


def release_record(s: Settings, context: Context, msg: Message, phase: str, *mechanisms: tuple) -> list[dict]:
    """The site's own record of a reply's releases, each (mechanism, σ, q, steps, L2 sensitivity),
    named as the run's ledger names them, with the run and round they went to."""
    config = msg.content.config_records.get("config")
    return [{"run": Path(s.run_dir).name if s.run_dir else "", "flower-run": int(context.run_id),
             "round": int(config.get("server-round", 0)) if config is not None else 0, "phase": phase,
             "mechanism": name, "noise_multiplier": float(sigma), "sample_rate": float(q), "steps": int(steps),
             "sensitivity": float(sensitivity)} for name, sigma, q, steps, sensitivity in mechanisms]


def secret_noise(n: int, std: float) -> torch.Tensor:
    """N(0, std²) noise from the OS entropy pool, as in training: a seed anyone knows could be replayed."""
    return std * torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(secrets.randbits(63)))


@app.train()
@site_errors
def train(msg: Message, context: Context) -> Message:
    """Two releases: the adapter after DP-SGD (σ, q, local-steps) and the noisy example count
    FedAvg weighs it by (σ_n, 1, 1). Both are priced, from public numbers only, before training."""
    if msg.content["config"].get("phase") == PRIOR_PHASE:  # the prior's histogram inside SecAgg+
        return histogram_reply(msg, context, shared=True)
    s, budget, state_dir, model, tokenizer, train_examples, _, _ = prepare(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    history = load_history(state_dir)
    q, releases = train_releases(s, budget)
    if reason := check_budget(s, budget, state_dir, history, releases) or distributed_noise_refusal(s, budget):
        return decline(msg, reason, epsilon(history, s.delta, s.accountant), budget, state_dir, history)
    share = noise_share(s, budget)
    # A simulated client is its partition, whatever node id it got this run.
    node = int(context.node_config.get("partition-id", context.node_id))
    seed = s.seed * 1_000_003 + server_round * 7919 + node % 100_003
    canaries = gradient_canaries(context, s, state_dir, server_round)
    result = train_local(model, tokenizer, train_examples, s, history, seed, q, canaries, share)
    if cache := prefix_cache(model, tokenizer):
        cache.save_new()  # for a deployed site's next process
    if canaries is not None:
        canaries.save()
    # FedAvg's weight: how many privacy units (examples or users) trained; sensitivity 1 either way.
    count, eps = float(len(privacy_units(train_examples, s.privacy_unit))), math.inf
    if s.distributed_noise:  # every site's noisy gradient weighs the same: no count is released
        count, history = 1.0, result.history
        rows = release_record(s, context, msg, "train",
                              ("dp-sgd", s.noise_multiplier, result.sample_rate, result.steps, s.max_grad_norm))
        rows[0].update(share_fields(s.noise_multiplier, share, result.quantization_slack))
        eps = save_history(state_dir, history, s.accountant, s.delta, s.privacy_unit, rows)
    elif s.dp:
        # Clamping at 1 is post-processing: FedAvg needs a positive weight.
        count = max(1.0, count + float(secret_noise(1, s.count_noise_multiplier)))
        history = result.history + [(s.count_noise_multiplier, 1.0, 1)]
        eps = save_history(state_dir, history, s.accountant, s.delta, s.privacy_unit, release_record(
            s, context, msg, "train",
            ("dp-sgd", s.noise_multiplier, result.sample_rate, result.steps, s.max_grad_norm),
            ("gaussian-count", s.count_noise_multiplier, 1.0, 1, 1.0)))
    metrics = {
        "num-examples": count,
        "epsilon": eps,
        "delta": s.delta,
        "steps": result.steps,
        "sample-rate": result.sample_rate,
        "noise-multiplier": s.noise_multiplier if s.dp else 0.0,
        "max-grad-norm": s.max_grad_norm,
        "count-noise-multiplier": s.count_noise_multiplier if s.dp and not s.distributed_noise else 0.0,
        "epsilon-max": budget.epsilon_max,
        "declined": 0,
        **identity(state_dir, history),
    }
    content = RecordDict({"arrays": ArrayRecord(adapter_state(model)), "metrics": MetricRecord(metrics)})
    check_reply("train", content)
    return Message(content=content, reply_to=msg)


def gradient_canaries(context: Context, s: Settings, state_dir: Path, server_round: int) -> GradientCanaries | None:
    """The site's white-box audit canaries, when its own data folder asks for them (never the server).
    Not in a distributed-noise round: the noise this site adds there is only its share of σ."""
    spec = data_paths(context, s)[0] / GradientCanaries.FILE
    if not s.dp or s.distributed_noise or not spec.is_file():
        return None
    observations = state_dir / "gradient-canaries" / f"round-{server_round:03d}.npy"
    try:
        return GradientCanaries(json.loads(spec.read_text()), observations)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{spec}: not a canary file ({e}); expected "
                        '{"seed": "<hex>", "included": [true, false, ...]}') from None


def train_releases(s: Settings, budget: Budget) -> tuple[float, list[tuple]]:
    """A train round's releases, (σ, q, steps) each, from public numbers only: DP-SGD at the public
    rate q = batch-size / declared-examples (or declared-users), then the noisy count (none under
    distributed noise, where every site weighs 1)."""
    q = public_sample_rate(s.batch_size, budget, s.privacy_unit) if s.dp else 0.0
    count = [] if s.distributed_noise else [(s.count_noise_multiplier, 1.0, 1)]
    return q, [(s.noise_multiplier, q, s.local_steps), *count]


def distributed_noise_refusal(s: Settings, budget: Budget) -> str | None:
    """Why this site takes no distributed-noise round, if it does not: sharing its noise is the
    site's own choice (``distributed-noise-max-sites``), never the server's."""
    if s.distributed_noise and budget.distributed_noise_max_sites is None:
        return (f"distributed-noise: this site shares its DP-SGD noise with no other site ({budget.source} sets no "
                "distributed-noise-max-sites)")
    return None


def noise_share(s: Settings, budget: Budget) -> SecureSum | None:
    """The SecAgg+ protocol this site's DP-SGD noise is shared in (it adds σ/√T), or None.

    Only inside SecAgg+ (``inside_secure_sum``: the protocol's threshold T, the fewest masked
    vectors its sum is unmasked from, and its grid), and only up to the site's own limit: a share
    of σ sent where the server could read it alone would be released at σ/√T while charged at σ."""
    if not s.distributed_noise:
        return None
    protocol = inside_secure_sum()
    if protocol is None:
        raise ConfigError("distributed-noise: a train request outside SecAgg+; this site sends its share of the "
                          "noise only inside the secure sum")
    if protocol.threshold > budget.distributed_noise_max_sites:
        raise ConfigError(f"distributed-noise: SecAgg+'s threshold is {protocol.threshold} sites, more than this "
                          f"site's distributed-noise-max-sites = {budget.distributed_noise_max_sites}")
    return protocol


@app.query("price")
@site_errors
def price(msg: Message, context: Context) -> Message:
    """Would this site take a train round (or the prior's SecAgg+ round)? Asked before a SecAgg+
    round, whose protocol has no place for a decline. The answer is a decline, or an empty reply
    (take part); it releases nothing and costs nothing."""
    s, budget, _, _, state_dir = settings_and_budget(context)
    history = load_history(state_dir)
    prior = msg.content["config"].get("phase") == PRIOR_PHASE  # the prior's histogram inside SecAgg+
    releases = [(s.prior_noise_multiplier, 1.0, 1)] if prior else train_releases(s, budget)[1]
    if reason := (check_budget(s, budget, state_dir, history, releases) or distributed_noise_refusal(s, budget)):
        return decline(msg, reason, epsilon(history, s.delta, s.accountant), budget, state_dir, history)
    content = RecordDict()
    check_reply("price", content)
    return Message(content, reply_to=msg)


@app.query("popularity")
@site_errors
def popularity(msg: Message, context: Context) -> Message:
    """A noisy histogram of this client's training targets, for the global popularity prior.

    Gaussian mechanism with L2 sensitivity 1 in the privacy unit (``unit_histogram``: adding or
    removing one example changes one count by 1; one user's counts are scaled to unit norm),
    and N(0, σ_h²) noise is added to every count. It enters the same
    accountant history as (σ_h, 1.0, 1) and its cost is part of the cumulative ε. Under central DP
    (``central-dp = true``, ``dp = false``) the site sends its histogram scaled to L2 norm 1 and
    the server adds the noise (``server/prior.py``).
    """
    return histogram_reply(msg, context, shared=False)


def histogram_reply(msg: Message, context: Context, shared: bool) -> Message:
    """The prior's histogram (``popularity``), or with ``shared`` this site's share of it inside
    SecAgg+ under distributed noise: N(0, σ_h²/T) on counts boxed to [0, r/2 / HISTOGRAM_UNIT]
    (a projection: the sensitivity stays 1), sent in units of HISTOGRAM_UNIT (every reply weighs
    1). The sum of ≥ T shares carries σ_h; the site is charged (σ_h, 1, 1) either way."""
    s, budget, data_dir, catalog_path, state_dir = settings_and_budget(context)
    catalog, train_examples, _, _ = load_data(data_dir, catalog_path, s.history_len)
    history = load_history(state_dir)
    if reason := (check_budget(s, budget, state_dir, history, [(s.prior_noise_multiplier, 1.0, 1)])
                  or (distributed_noise_refusal(s, budget) if shared else None)):
        return decline(msg, reason, epsilon(history, s.delta, s.accountant), budget, state_dir, history)
    share = noise_share(s, budget) if shared else None
    counts, eps = unit_histogram(train_examples, len(catalog), s.privacy_unit), math.inf
    if s.central_dp:  # the server adds the noise (dp = false here): the site bounds its share to L2 norm 1
        counts = counts / max(1.0, float(counts.norm()))
    if s.dp:
        rows = release_record(s, context, msg, "prior", ("gaussian-histogram", s.prior_noise_multiplier, 1.0, 1, 1.0))
        if share is None:
            counts += secret_noise(len(catalog), s.prior_noise_multiplier).float()
        else:
            slack = histogram_slack(s, share, len(catalog))  # refused before any noise is drawn
            counts = shared_histogram(counts, s, share)
            rows[0].update(share_fields(s.prior_noise_multiplier, share, slack))
        history = history + [(s.prior_noise_multiplier, 1.0, 1)]
        eps = save_history(state_dir, history, s.accountant, s.delta, s.privacy_unit, rows)
    metrics = {"epsilon": eps, "delta": s.delta,
               "noise-multiplier": s.prior_noise_multiplier if s.dp else 0.0, "sample-rate": 1.0, "steps": 1,
               "epsilon-max": budget.epsilon_max, "declined": 0, "num-examples": 1.0, **identity(state_dir, history)}
    content = RecordDict({"arrays": ArrayRecord({"counts": counts}), "metrics": MetricRecord(metrics)})
    check_reply("prior", content)
    return Message(content=content, reply_to=msg)


def shared_histogram(counts: torch.Tensor, s: Settings, share: SecureSum) -> torch.Tensor:
    box = share.clipping_range / 2 / HISTOGRAM_UNIT
    noise = secret_noise(len(counts), s.prior_noise_multiplier / math.sqrt(share.threshold))
    return ((counts.double().clamp(0.0, box) + noise) * HISTOGRAM_UNIT).float()


def histogram_slack(s: Settings, share: SecureSum, num_items: int) -> float:
    """τ of a histogram share (client/secure_aggregation.py): its values lie within r/2 before the noise."""
    noise_std = s.prior_noise_multiplier / math.sqrt(share.threshold) * HISTOGRAM_UNIT
    slack = quantization_slack(share, noise_std, share.clipping_range / 2, num_items)
    if not slack <= QUANTIZATION_SLACK_MAX:
        raise ConfigError(f"distributed-noise: SecAgg+'s quantization (±{share.clipping_range:g} in {share.levels} "
                          f"steps) would leave τ = {slack:.3g} > {QUANTIZATION_SLACK_MAX:g} on the prior's histogram")
    return slack


def share_fields(sigma: float, share: SecureSum, slack: float) -> dict:
    """What a site's record of a distributed-noise release adds: σ is the sum's; its own share
    carried σ/√T (its guarantee should SecAgg+ fail it); SecAgg+'s rounding adds τ to δ."""
    return {"noise-shared-by": share.threshold, "own-noise-multiplier": sigma / math.sqrt(share.threshold),
            "quantization-slack": slack}


@app.evaluate()
@site_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Noisy sums of HR@10, NDCG@10, Recall@20 and the user count, on the splits asked for.

    The request's ``splits`` names them: ``val`` every round, ``val,test`` at the last round of
    a run that evaluates the test split (server/rounds.py). Gaussian mechanism on all the sums
    together: each user adds at most 1 to each of the 4 sums per split, so removing any part of
    one user's data moves the vector by at most √(4·splits) in L2; N(0, (σ_e·√(4·splits))²) goes
    on each sum, accounted as (σ_e, 1.0, 1) whatever the splits. The server divides noisy sums by
    noisy counts. A simulated site also sends the exact means (its data is the simulator's).
    """
    s, budget, state_dir, model, tokenizer, _, valid, test = prepare(msg, context)
    splits = requested_splits(msg)
    history = load_history(state_dir)
    if reason := check_budget(s, budget, state_dir, history, [(s.eval_noise_multiplier, 1.0, 1)]):
        return decline(msg, reason, epsilon(history, s.delta, s.accountant), budget, state_dir, history)
    examples = {"val": valid, "test": test}
    sums = {f"{EVAL_SPLITS[split]}{k}": v for split in splits
            for k, v in evaluation_sums(model, tokenizer, examples[split], s.max_length).items()}
    if cache := prefix_cache(model, tokenizer):
        cache.save_new()  # for a deployed site's next process
    released, eps = dict(sums), math.inf
    if s.dp:
        noise = secret_noise(len(sums), s.eval_noise_multiplier * eval_sensitivity(len(splits)))
        released = {k: v + float(e) for (k, v), e in zip(sums.items(), noise)}
        history = history + [(s.eval_noise_multiplier, 1.0, 1)]
        eps = save_history(state_dir, history, s.accountant, s.delta, s.privacy_unit, release_record(
            s, context, msg, "evaluate",
            ("gaussian-eval-sums", s.eval_noise_multiplier, 1.0, 1, eval_sensitivity(len(splits)))))
    metrics = {**released, "noise-multiplier": s.eval_noise_multiplier if s.dp else 0.0, "epsilon": eps,
               "delta": s.delta,
               "epsilon-max": budget.epsilon_max, "declined": 0, **identity(state_dir, history)}
    if is_simulated(context):
        for prefix in (EVAL_SPLITS[split] for split in splits):
            n = sums[f"{prefix}count"]
            metrics[f"exact-{prefix}count"] = n
            metrics.update({f"exact-{prefix}{k}": sums[f"{prefix}sum-{k}"] / max(n, 1) for k in METRICS})
    content = RecordDict({"metrics": MetricRecord(metrics)})
    check_reply("evaluate", content)
    return Message(content=content, reply_to=msg)


def requested_splits(msg: Message) -> list[str]:
    """The evaluation splits the server asked for (``val`` when it names none), checked."""
    config = msg.content.config_records.get("config")
    asked = str(config.get("splits", "val")) if config is not None else "val"
    splits = [name.strip() for name in asked.split(",") if name.strip()]
    if not splits or len(set(splits)) != len(splits) or not set(splits) <= set(EVAL_SPLITS):
        raise ConfigError(f"evaluate: splits {asked!r}; expected a comma-separated subset of {sorted(EVAL_SPLITS)}")
    return splits
