"""The record step of a server round: what the ledger holds of each reply and each release.

A round's ``RoundRecord`` gathers one participant row per reply (its status and reason, the ε it
reported and how many releases of its accountant history that ε covers) and one mechanism row
per DP release, with the parameters the audit needs to recompute ε. It is written to the
ledger in one transaction when the round commits (``Ledger.commit_round``).

The releases a reply carries are its kind's own (``OWN_RELEASES``: e.g. DP-SGD and the noisy
count for a train reply) plus any of the client's earlier releases the ledger has no record
of (``unrecorded``: the server died mid-round, or dropped the reply); a client's ε covers them
all, so the audit must see them all.
"""

from __future__ import annotations

import logging
import math

from flwr.app import MetricRecord

from common.releases import EVAL_SPLITS, eval_sensitivity
from server.ledger import Ledger
from server.replies import Reply

log = logging.getLogger("fedrec.server")

# The status an accepted reply is recorded with, per phase.
DONE = {"train": "trained", "evaluate": "evaluated", "prior": "answered"}


def own_releases(phase: str, m: MetricRecord) -> list[dict]:
    """The mechanisms an accepted reply of ``phase`` released (none without DP: σ = 0)."""
    if m["noise-multiplier"] <= 0:
        return []
    if phase == "train":
        count = ([{"mechanism": "gaussian-count", "noise_multiplier": m["count-noise-multiplier"], "sample_rate": 1.0,
                   "steps": 1, "max_grad_norm": 1.0}]
                 if m["count-noise-multiplier"] > 0 else [])  # none under distributed noise: every site weighs 1
        return [{"mechanism": "dp-sgd", "noise_multiplier": m["noise-multiplier"], "sample_rate": m["sample-rate"],
                 "steps": int(m["steps"]), "max_grad_norm": m["max-grad-norm"]}, *count]
    if phase == "evaluate":
        splits = sum(f"{prefix}count" in m for prefix in EVAL_SPLITS.values())
        return [{"mechanism": "gaussian-eval-sums", "noise_multiplier": m["noise-multiplier"], "sample_rate": 1.0,
                 "steps": 1, "max_grad_norm": eval_sensitivity(splits)}]
    return [{"mechanism": "gaussian-histogram", "noise_multiplier": m["noise-multiplier"], "sample_rate": 1.0,
             "steps": 1, "max_grad_norm": 1.0}]


class RoundRecord:
    def __init__(self, ledger: Ledger, accountant: str):
        self.ledger, self.accountant = ledger, accountant
        self.participants: list[dict] = []
        self.mechanisms: list[dict] = []

    def replies(self, phase: str, replies: list[Reply], **extra) -> None:
        """A participant row per reply, and every release each carries. ``extra`` names more
        columns of an accepted reply's row, each a function of the reply (e.g. its update norm)."""
        for r in replies:
            row = {"node": r.name, "phase": phase, "status": DONE[phase] if r.status == "accepted" else r.status}
            if r.status == "failed":
                self.participants.append({**row, "reason": r.reason})
                continue
            m = r.metrics
            own = own_releases(phase, m) if r.status == "accepted" else []
            self.mechanisms += self.unrecorded(r.name, m, len(own))
            self.mechanisms += [{"node": r.name, "phase": phase, **mechanism, "delta": m["delta"],
                                 "accountant": self.accountant} for mechanism in own]
            if r.status == "rejected":  # its reported ε is not trusted: nothing of it is recorded
                self.participants.append({**row, "reason": r.reason})
                continue
            more = {k: column(r) for k, column in extra.items()} if r.status == "accepted" else {}
            self.participants.append({**row, "reason": r.reason, **privacy_columns(m), **more})

    def server_release(self, release: dict) -> None:
        """The server's own DP release (central DP): its participant and mechanism rows."""
        self.participants.append(release["participant"])
        self.mechanisms.append(release["mechanism"])

    def recorded(self, node: str) -> list[tuple]:
        """Every release of ``node`` the server knows of: committed, then this round's so far."""
        return self.ledger.releases(node) + [(m["noise_multiplier"], m["sample_rate"], m["steps"])
                                             for m in self.mechanisms if m["node"] == node]

    def unrecorded(self, node: str, m: MetricRecord, own: int) -> list[dict]:
        """Releases in a client's reported accountant history that the ledger has no record of.

        The client's history must extend what the ledger holds for it (its last ``own`` entries
        are this reply's own releases, recorded as what they are); the extra entries are recorded
        in this round as phase ``unrecorded``, so ``fedrec audit`` recomputes the ε the client
        reports. A history that does not extend the ledger's is left alone: the audit then
        reports the mismatch.
        """
        try:
            history = list(zip(m["history-noise-multiplier"], m["history-sample-rate"], m["history-steps"],
                               strict=True))
        except (KeyError, TypeError, ValueError):
            return []
        if own:
            history = history[:-own]
        recorded = self.recorded(node)
        if [tuple(h) for h in history[:len(recorded)]] != [tuple(r) for r in recorded]:
            log.warning("%s: its accountant history does not extend the ledger's record of it", node)
            return []
        return [{"node": node, "phase": "unrecorded", "mechanism": "dp-sgd" if q < 1 else "gaussian",
                 "noise_multiplier": sigma, "sample_rate": q, "steps": int(steps), "max_grad_norm": None,
                 "delta": m["delta"], "accountant": self.accountant} for sigma, q, steps in history[len(recorded):]]

    def commit(self, server_round: int, metrics: dict) -> None:
        self.ledger.commit_round(server_round, self.participants, self.mechanisms, metrics)
        self.participants, self.mechanisms = [], []


def privacy_columns(m: MetricRecord) -> dict:
    """What a reply says of the client's privacy: its ε, δ, budget, and how many releases of its
    accountant history that ε covers (so the audit recomputes exactly that prefix)."""
    steps = m.get("history-steps")
    return {"epsilon": finite_or_none(m["epsilon"]), "delta": m["delta"],
            "epsilon_max": finite_or_none(m["epsilon-max"]),
            "releases": len(steps) if isinstance(steps, list) else None}


def finite_or_none(x: float) -> float | None:
    """ε = inf means "no guarantee"; JSON and the ledger hold it as null."""
    return x if math.isfinite(x) else None


def json_metrics(record: MetricRecord) -> dict:
    """A client's metrics for the run directory. The client's id and accountant history are
    left out: the ledger holds what they tell (pseudonymously)."""
    return {k: finite_or_none(v) for k, v in record.items() if not isinstance(v, list) and k != "client-id"}
