"""fedrec ServerApp: FedAvg over the LoRA adapter only, and the run directory.

The run directory (``run-dir``, default ``$FEDREC_HOME/runs/run-<run id>``) holds

    config.json          the resolved run config, base-model and catalog SHA-256
    catalog.csv          the public catalog the scores index into
    adapters/round-NNN/  the global adapter after round NNN (000 = initial), PEFT format
    metrics.jsonl        one JSON object per round (machine-readable)
    prior.json           the DP popularity prior: who answered, their ε after it
    ledger.sqlite        the privacy ledger, one transaction per committed round (server/ledger.py)
    summary.json         the last round's figures, written when the run ends

Clients enforce their own privacy budgets: a client that declines a round for budget is
never sampled again, and when fewer than ``min-train-nodes`` clients are left the run stops
cleanly, saying so in ``summary.json`` ("stopped").

With ``central-dp = true`` the server also gives a client-level guarantee
(``server/central_dp.py``): Poisson client sampling, each update clipped, Gaussian noise on
the sum, equal weights and a fixed denominator in place of FedAvg's weighted mean.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import re
import secrets
import shutil
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import flwr
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp.strategy import FedAvgM, FedMedian, FedTrimmedAvg, MultiKrum
from safetensors.torch import load_file

from common.config import Settings, fedrec_home, partition_root
from common.data import catalog_fingerprint, load_movielens, read_catalog, write_catalog
from common.model import (adapter_config, adapter_state, build_model, fingerprint, is_trained, load_adapter_state,
                          load_encoder, resolve_model_path, set_item_bias)
from common.metrics import METRICS
from common.privacy import CLIENT_UNIT, UNIT
from common.releases import EVAL_SENSITIVITY
from server.central_dp import ACCOUNTANT as CENTRAL_ACCOUNTANT
from server.central_dp import ClientLevelDP
from server.ledger import Ledger, pseudonym
from server.secure_aggregation import SecureGrid
from server.validation import check_evaluate_reply, check_fields, check_prior_reply, check_train_reply, update_norm

app = ServerApp()
log = logging.getLogger("fedrec.server")


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. too few clients have privacy budget left); not a crash."""


class EligibleNodes:
    """The grid as sampling sees it: nodes that declined for budget are left out."""

    def __init__(self, grid: Grid, excluded: set[int]):
        self.grid, self.excluded = grid, excluded

    def get_node_ids(self):
        return [n for n in self.grid.get_node_ids() if n not in self.excluded]


class RunRecorder(FedAvgM):
    """Flower's FedAvg (FedAvgM: with a server learning rate η_s, no momentum by default), plus
    budget-aware sampling, the ledger, and the run directory.

    global ← global + η_s · (weighted mean of the clients' adapters − global); η_s = 1 is plain
    FedAvg. η_s > 1 lets clients take small local steps under their own DP noise while the
    server scales up the averaged update, whose noise is √K smaller than any one client's.
    """

    def __init__(self, run_dir: Path, model, settings: Settings, reference_path: Path | None, ledger: Ledger,
                 central: ClientLevelDP | None = None, robust=None, round_offset: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.central = central
        self.robust = robust  # a Flower strategy whose aggregate replaces FedAvg's weighted mean
        self.sent: ArrayRecord | None = None  # the global adapter this round's clients received
        self.sampled: list[int] = []  # the nodes it was sent to
        self.instructions: list[Message] = []  # the train messages themselves (their ids once sent)
        self.run_dir, self.model, self.settings = run_dir, model, settings
        self.reference_path = reference_path
        self.ledger = ledger
        self.names: dict[int, str] = {}  # Flower node id -> ledger pseudonym (from the client's own id)
        self.pseudonym_key = ledger.meta("pseudonym-key")
        # A resumed run carries on from its last committed round: Flower counts from 1 again.
        self.round_offset = round_offset
        self.exhausted: set[int] = set()  # nodes that declined for budget: never sampled again
        self.started = time.time()
        self.row: dict = {}
        self.ledger_rows: tuple[list, list] = ([], [])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.round_offset
        eligible = EligibleNodes(grid, self.exhausted)
        left = len(eligible.get_node_ids())
        if left < self.min_train_nodes:
            raise RunStopped(f"round {server_round}: only {left} client(s) have privacy budget left "
                             f"({len(self.exhausted)} declined for budget); min-train-nodes is {self.min_train_nodes}")
        self.sent = arrays
        if self.central is None:
            messages = list(super().configure_train(server_round, arrays, config, eligible))
            self.sampled = [m.metadata.dst_node_id for m in messages]
            self.instructions = messages
            return messages
        # Central DP samples by Poisson, as its accountant assumes: no fixed count, no minimum.
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.sampled = self.central.sample(eligible.get_node_ids())
        self.instructions = [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)
                             for node in self.sampled]
        return self.instructions

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def save_adapter(self, server_round: int, arrays: ArrayRecord) -> None:
        load_adapter_state(self.model, arrays.to_torch_state_dict())
        target = self.run_dir / "adapters" / f"round-{server_round:03d}"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        sent = self.sent.to_torch_state_dict()
        clients, participants, mechanisms, central, accepted, declined = [], [], [], {}, [], []
        for msg in replies:
            node = self.replier(msg)
            entry = {"node": client_name(self.pseudonym_key, msg, self.names, node), "phase": "train"}
            if msg.has_error():  # crashed, or dropped out of SecAgg+
                reason = short_reason(msg.error.reason)
                clients.append({"node": node, "error": reason})
                participants.append({**entry, "status": "failed", "reason": reason})
                continue
            m = msg.content.metric_records.get("metrics", MetricRecord())
            if is_decline(msg):
                mechanisms += unrecorded_releases(self.recorded(entry["node"], mechanisms), entry["node"], m,
                                                  self.settings.accountant, 0)
                declined.append(node)
                reason = str(msg.content["decline"]["reason"])
                clients.append({"node": node, **json_metrics(m), "decline-reason": reason})
                participants.append({**entry, "status": "declined", "reason": reason, **ledger_privacy(m)})
                continue
            # SecAgg+ replies carry the aggregate, not the client's update: nothing to check per client.
            reason = None if self.settings.secure_aggregation else check_train_reply(
                msg.content, sent, self.settings.max_update_norm)
            if reason:
                log.warning("round %s: dropped the reply of node %s: %s", server_round, node, reason)
                clients.append({"node": node, "rejected": reason})
                participants.append({**entry, "status": "rejected", "reason": reason})
                # Dropped, but what the client spent on it is still spent: record its history.
                mechanisms += unrecorded_releases(self.recorded(entry["node"], mechanisms), entry["node"], m,
                                                  self.settings.accountant, 0)
                continue
            accepted.append(msg)
            dp = m["noise-multiplier"] > 0
            mechanisms += unrecorded_releases(self.recorded(entry["node"], mechanisms), entry["node"], m,
                                              self.settings.accountant, 2 if dp else 0)
            clients.append({"node": node, **json_metrics(m)})
            participants.append({**entry, "status": "trained", "num_examples": round(m["num-examples"]),
                                 # SecAgg+ hides each client's update: its norm is unknown here.
                                 "update_norm": None if self.settings.secure_aggregation
                                 else update_norm(msg.content["arrays"].to_torch_state_dict(), sent),
                                 **ledger_privacy(m)})
            if dp:
                mechanisms.append({**entry, "mechanism": "dp-sgd", "noise_multiplier": m["noise-multiplier"],
                                   "sample_rate": m["sample-rate"], "steps": int(m["steps"]),
                                   "max_grad_norm": m["max-grad-norm"], "delta": m["delta"],
                                   "accountant": self.settings.accountant})
                mechanisms.append({**entry, "mechanism": "gaussian-count",
                                   "noise_multiplier": m["count-noise-multiplier"], "sample_rate": 1.0, "steps": 1,
                                   "max_grad_norm": 1.0, "delta": m["delta"], "accountant": self.settings.accountant})
        for node in sorted(set(self.sampled) - {self.replier(m) for m in replies}):
            reason = f"no reply within round-timeout = {self.settings.round_timeout:g} s"
            clients.append({"node": node, "error": reason})
            participants.append({"node": client_name(self.pseudonym_key, None, self.names, node), "phase": "train",
                                 "status": "failed", "reason": reason})
        self.exhausted.update(declined)
        # Replies arrive in whatever order the network gives; floating-point sums depend on the
        # order. Sorted by content, the same replies always give the same bits.
        accepted.sort(key=lambda msg: content_digest(msg.content["arrays"]))
        if self.central is None and len(accepted) < self.settings.min_replies:
            problems = "; ".join(f"node {c['node']}: {c.get('error') or c.get('rejected') or c.get('decline-reason')}"
                                 for c in clients if "error" in c or "rejected" in c or "decline-reason" in c)
            raise RunStopped(f"round {server_round}: {len(accepted)} usable repl{'y' if len(accepted) == 1 else 'ies'}"
                             f", fewer than min-replies = {self.settings.min_replies}; the global adapter of round "
                             f"{server_round - 1} stands ({problems})")
        if self.central is not None:
            arrays, metrics, central = self.aggregate_central(accepted, sent)
            participants.append({"node": "server", "phase": "central", "status": "released",
                                 "num_examples": central["central-clients"], "epsilon": central["central-epsilon"],
                                 "delta": self.central.delta})
            mechanisms.append({"node": "server", "phase": "central", "mechanism": "client-level-gaussian",
                               "noise_multiplier": self.central.noise_multiplier,
                               "sample_rate": self.central.sample_rate, "steps": 1,
                               "max_grad_norm": self.central.clipping_norm, "delta": self.central.delta,
                               "accountant": CENTRAL_ACCOUNTANT})
        elif self.robust is not None:
            if isinstance(self.robust, MultiKrum) and self.settings.krum_select == 0:
                self.robust.num_nodes_to_select = max(1, len(accepted) - self.settings.krum_malicious)
            robust, metrics = self.robust.aggregate_train(server_round, accepted)
            aggregate = robust.to_torch_state_dict()
            arrays = ArrayRecord({k: sent[k] + self.server_learning_rate * (aggregate[k] - sent[k]) for k in sent})
            self.current_arrays = arrays
        else:
            arrays, metrics = super().aggregate_train(server_round, accepted)
        self.ledger_rows = (participants, mechanisms)
        ok = [c for c in clients if "error" not in c and "rejected" not in c and "decline-reason" not in c]
        eps = [c["epsilon"] for c in ok if c["epsilon"] is not None]
        self.row = {
            "round": server_round,
            "clients": len(ok),
            "declined": len(declined),
            "failures": sum("error" in c for c in clients),
            "rejected": sum("rejected" in c for c in clients),
            "epsilon-max": max(eps) if eps else None,
            "epsilon-median": statistics.median(eps) if eps else None,
            "delta": max((c["delta"] for c in ok), default=None) if self.settings.dp else None,
            **central,
            "client-updates": clients,
        }
        if arrays is not None:
            self.save_adapter(server_round, arrays)
        return arrays, metrics

    def recorded(self, node: str, pending: list[dict]) -> list[tuple]:
        """Every release of ``node`` the server knows of: committed, then this round's so far (``pending``)."""
        return self.ledger.releases(node) + [(m["noise_multiplier"], m["sample_rate"], m["steps"])
                                             for m in pending if m["node"] == node]

    def replier(self, reply: Message) -> int:
        """The node a reply is about. An error the SuperLink writes itself (e.g. "Node Unavailable")
        comes from the SuperLink's own node id; the instruction it answers names the node."""
        if reply.metadata.src_node_id != SUPERLINK_NODE_ID:
            return reply.metadata.src_node_id
        for sent in self.instructions:
            if sent.metadata.message_id and sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def aggregate_central(self, trained: list[Message], sent: dict):
        """global + η_s · noisy mean update (server/central_dp.py), in place of FedAvgM's weighted mean."""
        update = self.central.noisy_mean_update(sent, [m.content["arrays"].to_torch_state_dict() for m in trained],
                                                {k for k in sent if is_trained(k, self.settings)})
        arrays = ArrayRecord({k: sent[k] + self.server_learning_rate * update[k] for k in sent})
        self.current_arrays = arrays
        metrics = self.train_metrics_aggr_fn([m.content for m in trained], self.weighted_by_key) if trained else None
        eps = self.central.release()
        return arrays, metrics, {"central-epsilon": eps, "central-delta": self.central.delta,
                                 "central-clients": len(trained)}

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        participants, mechanisms = self.ledger_rows
        accepted, evaluations = [], []
        noise_std = self.settings.eval_noise_multiplier * EVAL_SENSITIVITY
        for msg in replies:
            node = self.replier(msg)
            entry = {"node": client_name(self.pseudonym_key, msg, self.names, node), "phase": "evaluate"}
            if msg.has_error():
                participants.append({**entry, "status": "failed", "reason": short_reason(msg.error.reason)})
                continue
            m = msg.content.metric_records.get("metrics", MetricRecord())
            if is_decline(msg):
                mechanisms += unrecorded_releases(self.recorded(entry["node"], mechanisms), entry["node"], m,
                                                  self.settings.accountant, 0)
                participants.append({**entry, "status": "declined", "reason": str(msg.content["decline"]["reason"]),
                                     **ledger_privacy(m)})
                continue
            if reason := check_evaluate_reply(msg.content, noise_std):
                log.warning("round %s: dropped the evaluation of node %s: %s", server_round, node, reason)
                participants.append({**entry, "status": "rejected", "reason": reason})
                mechanisms += unrecorded_releases(self.recorded(entry["node"], mechanisms), entry["node"], m,
                                                  self.settings.accountant, 0)
                continue
            dp = m["noise-multiplier"] > 0
            mechanisms += unrecorded_releases(self.recorded(entry["node"], mechanisms), entry["node"], m,
                                              self.settings.accountant, 1 if dp else 0)
            if dp:
                mechanisms.append({**entry, "mechanism": "gaussian-eval-sums", "noise_multiplier": m["noise-multiplier"],
                                   "sample_rate": 1.0, "steps": 1, "max_grad_norm": EVAL_SENSITIVITY,
                                   "delta": m["delta"], "accountant": self.settings.accountant})
            participants.append({**entry, "status": "evaluated", **ledger_privacy(m)})
            evaluations.append({"node": node, "epsilon": m["epsilon"] if math.isfinite(m["epsilon"]) else None,
                                "delta": m["delta"]})
            accepted.append(m)
        self.ledger_rows = (participants, mechanisms)
        row = {"round": server_round, **self.row, **evaluation_row(accepted, noise_std),
               "client-evaluations": evaluations}
        if self.reference_path and self.reference_path.is_file():
            popularity = json.loads(self.reference_path.read_text())["test"]
            row.update({f"popularity-{k}": v for k, v in popularity.items()})
        row["elapsed-s"] = round(time.time() - self.started, 2)
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "round"}
        # The ledger commit is the round's commit point: a metrics row (or adapter) past the
        # ledger's last round is the round in flight, and --resume discards it.
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.ledger.commit_round(server_round, participants, mechanisms, numbers)
        self.row, self.ledger_rows = {}, ([], [])
        return MetricRecord({k: v for k, v in row.items() if k in METRICS})


def evaluation_row(replies: list[MetricRecord], noise_std: float) -> dict:
    """The round's metrics from the sites' evaluation releases.

    DP estimate (any deployment): Σ noisy sums / Σ noisy counts per metric, clamped to [0, 1]
    (post-processing). Exact (simulation only, where every site sends exact means): the
    user-weighted mean. The row's plain keys (``ndcg@10``…) hold the exact figures when every
    site sent them, else the DP estimates; ``metrics-source`` says which.
    """
    if not replies:
        return {}
    row = {"eval-sites": len(replies), "eval-noise-std-per-sum": noise_std}
    for prefix in ("", "val-"):
        count = sum(m[f"{prefix}count"] for m in replies)
        row[f"dp-{prefix}eval-users"] = count
        for k in METRICS:
            row[f"dp-{prefix}{k}"] = min(1.0, max(0.0, sum(m[f"{prefix}sum-{k}"] for m in replies) / max(count, 1.0)))
    exact = all(f"exact-{k}" in m for m in replies for k in METRICS)
    if exact:
        for prefix in ("", "val-"):
            users = sum(m[f"exact-{prefix}count"] for m in replies)
            row[f"{prefix}eval-users"] = int(users)
            row.update({f"{prefix}{k}": sum(m[f"exact-{prefix}{k}"] * m[f"exact-{prefix}count"] for m in replies)
                        / max(users, 1) for k in METRICS})
        row["metrics-source"] = "exact (simulation: the simulator owns every site's data); dp-* are the DP releases"
    else:
        row.update({f"{prefix}{k}": row[f"dp-{prefix}{k}"] for prefix in ("", "val-") for k in METRICS})
        row["eval-users"] = round(row["dp-eval-users"])
        row["metrics-source"] = "dp (Gaussian sums released by the sites)"
    return row


def content_digest(arrays: ArrayRecord) -> str:
    return hashlib.sha256(b"".join(arrays[k].data for k in sorted(arrays))).hexdigest()


def client_name(key: str, msg: Message | None, names: dict[int, str], node: int | None = None) -> str:
    """The ledger's pseudonym for the client behind ``msg`` (from Flower ``node``).

    Clients send their own random ``client-id``, which outlives a server restart (Flower's node
    ids in a simulation do not); a client that never sent one is named by its node id.
    """
    node = msg.metadata.src_node_id if node is None else node
    if msg is not None:
        if not msg.has_error() and "metrics" in msg.content:
            client = msg.content["metrics"].get("client-id")
            if isinstance(client, int) and not isinstance(client, bool):
                names[node] = pseudonym(key, client)
    return names.get(node) or pseudonym(key, f"flower-node-{node}")


def unrecorded_releases(recorded: list[tuple], node: str, m: MetricRecord, accountant: str,
                        includes_this: int) -> list[dict]:
    """Mechanisms in a client's reported accountant history that the ledger has no record of.

    A release the server received but never committed (it crashed mid-round, or dropped the
    reply) is still part of the client's ε. The client's history must extend what the ledger
    holds for it; the extra entries are recorded in this round as phase ``unrecorded``, so
    ``fedrec audit`` recomputes the ε the client reports. A history that does not extend the
    ledger's is left alone: the audit then reports the mismatch.
    """
    try:
        history = list(zip(m["history-noise-multiplier"], m["history-sample-rate"], m["history-steps"], strict=True))
    except (KeyError, TypeError, ValueError):
        return []
    if includes_this:  # the last entries are this reply's own releases, recorded as what they are
        history = history[:-includes_this]
    if [tuple(h) for h in history[:len(recorded)]] != [tuple(r) for r in recorded]:
        log.warning("%s: its accountant history does not extend the ledger's record of it", node)
        return []
    return [{"node": node, "phase": "unrecorded", "mechanism": "dp-sgd" if q < 1 else "gaussian",
             "noise_multiplier": sigma, "sample_rate": q, "steps": int(steps), "max_grad_norm": None,
             "delta": m["delta"], "accountant": accountant} for sigma, q, steps in history[len(recorded):]]


def short_reason(reason: str) -> str:
    """A client error in one line: Flower wraps the exception's message in a traceback, or (a
    deployed ClientApp) in ``<class '…'>:<'message'>``."""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "(no reason given)"
    last = re.sub(r"^<class '[^']*'>:<'", "", last.split("Message: ", 1)[-1])
    return last.removesuffix("'>").strip()


def is_decline(msg: Message) -> bool:
    """A well-formed decline (common/releases.py); a malformed one is checked, and dropped, as a reply."""
    return not msg.has_error() and "decline" in msg.content and check_fields("decline", msg.content) is None


def ledger_privacy(m: MetricRecord) -> dict:
    """What a reply says of the client's privacy: its ε, δ, budget, and how many releases of its
    accountant history that ε covers (so the audit recomputes exactly that prefix)."""
    steps = m.get("history-steps")
    return {"epsilon": m["epsilon"] if math.isfinite(m["epsilon"]) else None, "delta": m["delta"],
            "epsilon_max": m["epsilon-max"] if math.isfinite(m["epsilon-max"]) else None,
            "releases": len(steps) if isinstance(steps, list) else None}


def json_metrics(record: MetricRecord) -> dict:
    """A client's metrics for the run directory. Without DP a client reports ε = inf ("no
    guarantee"); JSON has no inf, so it becomes null. The client's id and accountant history
    are left out: the ledger holds what they tell (pseudonymously)."""
    return {k: (v if math.isfinite(v) else None) for k, v in record.items()
            if not isinstance(v, list) and k != "client-id"}


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Training metrics across clients: the (noisy) example total, and ε as a maximum, never a
    mean (an average ε is no one's guarantee). No loss: the sites do not release one."""
    metrics = [r["metrics"] for r in replies]
    examples = sum(m[weight_key] for m in metrics)
    return MetricRecord({
        weight_key: examples,
        "epsilon-max": max(m["epsilon"] for m in metrics),
        "delta": max(m["delta"] for m in metrics),
    })


def popularity_prior(grid: Grid, model, checks: dict, s: Settings, run_dir: Path, strategy: RunRecorder) -> set[int]:
    """Set the item bias to log(1 + Σ noisy client counts): a DP popularity prior.

    Each client answers with a Gaussian-noised histogram of its training targets (its own
    accountant records the release); the server only sums them and clamps at zero, which is
    post-processing. Under DP noise, learning this bias by DP-SGD alone takes far more steps.
    Returns the nodes that declined for budget. The query is ledger round 0, committed after
    the adapter with the prior is saved as round 0.
    """
    ledger = strategy.ledger
    nodes = wait_for_nodes(grid, s.min_train_nodes)
    messages = [Message(RecordDict({"config": ConfigRecord(checks)}), dst_node_id=node,
                        message_type="query.popularity") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=600))
    declined = [r for r in replies if is_decline(r)]
    participants, mechanisms, ok, rejected = [], [], [], []
    for r in replies:
        entry = {"node": client_name(strategy.pseudonym_key, r, strategy.names), "phase": "prior"}
        if r.has_error():
            participants.append({**entry, "status": "failed", "reason": short_reason(r.error.reason)})
            continue
        m = r.content.metric_records.get("metrics", MetricRecord())
        answered = not is_decline(r) and not (reason := check_prior_reply(r.content, num_items(model),
                                                                          s.prior_noise_multiplier))
        dp = answered and m["noise-multiplier"] > 0
        mechanisms += unrecorded_releases(ledger.releases(entry["node"]), entry["node"], m, s.accountant, int(dp))
        if is_decline(r):
            participants.append({**entry, "status": "declined", "reason": str(r.content["decline"]["reason"]),
                                 **ledger_privacy(m)})
            continue
        if not answered:
            log.warning("popularity prior: dropped the histogram of node %s: %s", r.metadata.src_node_id, reason)
            participants.append({**entry, "status": "rejected", "reason": reason})
            rejected.append({"node": r.metadata.src_node_id, "rejected": reason})
            continue
        ok.append(r)
        participants.append({**entry, "status": "answered", **ledger_privacy(m)})
        if dp:
            mechanisms.append({**entry, "mechanism": "gaussian-histogram", "noise_multiplier": m["noise-multiplier"],
                               "sample_rate": 1.0, "steps": 1, "max_grad_norm": 1.0, "delta": m["delta"],
                               "accountant": s.accountant})
    record = {"asked": len(nodes), "answered": len(ok), "noise-multiplier": s.prior_noise_multiplier if s.dp else 0.0,
              "errors": [short_reason(r.error.reason) for r in replies if r.has_error()],
              "declined": [str(r.content["decline"]["reason"]) for r in declined], "rejected": rejected,
              "client-updates": [{"node": r.metadata.src_node_id, **json_metrics(r.content["metrics"])} for r in ok]}
    (run_dir / "prior.json").write_text(json.dumps(record, indent=1))
    if not ok:
        log.warning("popularity prior: no client answered; starting from a zero bias")
    else:
        set_item_bias(model, sum(r.content["arrays"].to_torch_state_dict()["counts"] for r in ok))
    strategy.save_adapter(0, ArrayRecord(adapter_state(model)))
    ledger.commit_round(0, participants, mechanisms, {"answered": len(ok), "declined": len(declined)})
    return {r.metadata.src_node_id for r in declined}


def num_items(model) -> int:
    return model.get_base_model().item_embeddings.shape[0]


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum and time.time() < deadline:
        time.sleep(1)
    return nodes


def robust_aggregator(s: Settings):
    """Flower's robust strategy for ``aggregation``, used for its aggregate only (None = FedAvg).

    * median: coordinate-wise median of the client adapters (FedMedian);
    * trimmed-mean: per coordinate, drop the ``trim-fraction`` largest and smallest, average the
      rest (FedTrimmedAvg, β = trim-fraction);
    * multi-krum: keep the ``krum-select`` adapters closest to their n − f − 2 nearest others
      (f = ``krum-malicious``) and take their example-weighted mean (MultiKrum).
    """
    common = {"train_metrics_aggr_fn": aggregate_train_metrics, "min_train_nodes": 1, "min_available_nodes": 1}
    if s.aggregation == "median":
        return FedMedian(**common)
    if s.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=s.trim_fraction, **common)
    if s.aggregation == "multi-krum":
        return MultiKrum(num_malicious_nodes=s.krum_malicious, num_nodes_to_select=max(1, s.krum_select), **common)
    return None


def whole_or_fraction(x: float) -> int | float:
    """SecAggPlusWorkflow reads an int as a count and a float as a fraction of the clients."""
    return int(x) if x > 1 else x


def load_catalog(s: Settings):
    return read_catalog(s.catalog) if s.catalog else load_movielens(s.dataset or None)[0]


def resume_point(run_dir: Path, run_config: dict, checks: dict) -> tuple[int | None, dict]:
    """Bring ``run_dir`` back to its last committed round; (that round or None, what was discarded).

    The ledger's last committed round R is the commit point. Metrics rows and adapters after R
    belong to the round in flight when the server died: they are discarded, and the run goes on
    from ``adapters/round-R`` with round R + 1. Clients keep their own accountants; releases
    they made in the lost round are recorded when they next reply (``unrecorded_releases``).
    """
    config_file = run_dir / "config.json"
    if not config_file.is_file() or not (run_dir / "ledger.sqlite").is_file():
        raise RunStopped(f"resume: {run_dir} has no config.json and ledger.sqlite; is it a fedrec run directory?")
    config = json.loads(config_file.read_text())
    if {k: config.get(k) for k in checks} != checks:
        raise RunStopped(f"resume: the base model or catalog differs from the one {run_dir} was trained with")
    stored = config["run-config"]
    differ = sorted(k for k in set(stored) | set(run_config) if k != "resume" and stored.get(k) != run_config.get(k))
    if differ:
        raise RunStopped(f"resume: the run config differs from {config_file} in {', '.join(differ)}; "
                         "a run resumes with its own config")
    ledger = Ledger(run_dir / "ledger.sqlite")
    last = ledger.last_round()
    ledger.close()
    metrics_file = run_dir / "metrics.jsonl"
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    kept = [line for line in lines if last is not None and json.loads(line)["round"] <= last]
    tmp = metrics_file.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics_file)
    discarded = []
    for folder in sorted((run_dir / "adapters").glob("round-*")):
        number = folder.name.removeprefix("round-").removesuffix(".tmp")
        if folder.name.endswith(".tmp") or last is None or int(number) > last:
            shutil.rmtree(folder)
            discarded.append(folder.name)
    if last is not None and not (run_dir / "adapters" / f"round-{last:03d}").is_dir():
        raise RunStopped(f"resume: the ledger commits round {last} but {run_dir}/adapters/round-{last:03d} is missing")
    return last, {"discarded-metrics-rows": len(lines) - len(kept), "discarded-adapters": discarded,
                  "elapsed-s": json.loads(kept[-1]).get("elapsed-s", 0.0) if kept else 0.0}


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    s = Settings.from_run_config(dict(context.run_config))
    run_dir = Path(s.run_dir).expanduser() if s.run_dir else fedrec_home() / "runs" / f"run-{context.run_id}"
    run_dir.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(s)
    encoder, _ = load_encoder(s.model, s.model_layers)
    base_sha = fingerprint(encoder)
    model = build_model(encoder, len(catalog), adapter_config(s, encoder), seed=s.seed,
                        init_scale=s.initial_score_scale)
    model.peft_config["default"].base_model_name_or_path = str(resolve_model_path(s.model))
    checks = {"base-sha256": base_sha, "catalog-sha256": catalog_fingerprint(catalog)}
    if not s.resume:
        write_catalog(catalog, run_dir / "catalog.csv")
        (run_dir / "config.json").write_text(json.dumps({
            "run-config": dict(context.run_config), **checks, "num-items": len(catalog),
            "flwr": flwr.__version__, "privacy-unit": UNIT if s.dp else "none (dp = false)",
            "central-privacy-unit": CLIENT_UNIT if s.central_dp else "none (central-dp = false)",
        }, indent=1))
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / "ledger.sqlite").unlink(missing_ok=True)
    resumed_from, resume = None, {}
    if s.resume:
        resumed_from, resume = resume_point(run_dir, dict(context.run_config), checks)
    ledger = Ledger(run_dir / "ledger.sqlite")
    num_nodes = len(wait_for_nodes(grid, s.min_train_nodes))
    central = None
    if s.central_dp:
        s.check_population(num_nodes)
        central = ClientLevelDP(s.central_noise_multiplier, s.central_clipping_norm, s.central_delta, num_nodes,
                                s.expected_clients(num_nodes))
        for _ in ledger.releases("server"):  # a resumed run's accountant holds the committed releases
            central.accountant.compose(central.event)
    # INSERT OR IGNORE: a resumed run keeps its first start's values (its pseudonym key too).
    ledger.set_meta(**{"run-config": dict(context.run_config), "unit": UNIT if s.dp else "none (dp = false)",
                       "adjacency": "add/remove one training example of one client",
                       "accountant": s.accountant, "pseudonym-key": secrets.token_hex(16), **checks})
    if central:
        ledger.set_meta(**{"central-unit": CLIENT_UNIT, "central-population": num_nodes,
                           "central-expected-clients": central.expected_clients})
    # Simulations leave the popularity baseline of their split here; deployments have none.
    reference = partition_root(s, num_nodes) / "reference.json"
    offset = resumed_from or 0
    strategy = RunRecorder(
        run_dir, model, s, reference, ledger, central, robust_aggregator(s), offset,
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=min(s.min_train_nodes, max(1, num_nodes)),
        min_available_nodes=s.min_train_nodes,
        train_metrics_aggr_fn=aggregate_train_metrics,
        server_learning_rate=s.server_learning_rate,
    )
    if resumed_from is not None:
        adapter = run_dir / "adapters" / f"round-{resumed_from:03d}" / "adapter_model.safetensors"
        load_adapter_state(model, load_file(adapter))
        strategy.started = time.time() - resume["elapsed-s"]  # elapsed-s carries on from the last row
        with open(run_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps({"at": time.time(), "from-round": resumed_from, **resume,
                                "restore-s": round(time.time() - started, 3)}) + "\n")
        log.warning("resumed %s from round %s (restored in %.1f s)", run_dir, resumed_from, time.time() - started)
    elif s.popularity_prior:
        strategy.exhausted |= popularity_prior(grid, model, checks, s, run_dir, strategy)
    else:
        strategy.save_adapter(0, ArrayRecord(adapter_state(model)))
    initial = ArrayRecord(adapter_state(model))
    if s.secure_aggregation:
        grid = SecureGrid(grid, context, SecAggPlusWorkflow(
            whole_or_fraction(s.secagg_num_shares), whole_or_fraction(s.secagg_reconstruction_threshold),
            max_weight=s.secagg_max_weight, clipping_range=s.secagg_clipping_range))
    stopped = None
    try:
        if offset >= s.num_server_rounds:
            raise RunStopped(f"resume: all {s.num_server_rounds} rounds are committed already")
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=s.num_server_rounds - offset,
            timeout=s.round_timeout,
            train_config=ConfigRecord(checks),
            evaluate_config=ConfigRecord(checks),
        )
    except RunStopped as e:
        stopped = str(e)
        log.warning("run stopped: %s", stopped)
    finally:
        ledger.close()
    metrics_file = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    summary = {k: v for k, v in rows[-1].items() if k not in ("client-updates", "client-evaluations")} if rows else {}
    summary.update({"rounds": len(rows), "run-dir": str(run_dir), "nodes": num_nodes})
    if stopped:
        summary["stopped"] = stopped
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
