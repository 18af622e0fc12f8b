"""One server round, in the order its data flows: a Flower Strategy wrapping the run's aggregator.

    train      classify → validate → record → aggregate → checkpoint
    evaluate   classify → validate → record → metrics row → commit

Each step is a small function of its own module: ``server/replies.py`` (classify, validate),
``server/records.py`` (record), ``server/aggregators.py`` (aggregate: the one aggregator chosen
at start), ``server/run_dir.py`` (checkpoint, metrics rows). The ledger commit at the end of
evaluation is the round's commit point.

Clients enforce their own privacy budgets: a client that declines a round for budget is never
sampled again, and when fewer than ``min-train-nodes`` clients are left the run stops cleanly.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.config import ConfigError, Settings
from common.metrics import METRICS
from common.releases import EVAL_SPLITS, eval_sensitivity
from server.aggregators import ServerStep, content_digest
from server.records import RoundRecord, finite_or_none, json_metrics
from server.replies import Names, Reply, accepted, classify, validate
from server.run_dir import RunDirectory, RunStopped
from server.validation import check_evaluate_reply, check_train_reply, update_norm


class EligibleNodes:
    """The grid as sampling sees it: nodes that declined for budget are left out."""

    def __init__(self, grid: Grid, excluded: set[int]):
        self.grid, self.excluded = grid, excluded

    def get_node_ids(self):
        return [n for n in self.grid.get_node_ids() if n not in self.excluded]


class RoundPipeline(Strategy):
    def __init__(self, aggregator: ServerStep, run: RunDirectory, record: RoundRecord, s: Settings, names: Names,
                 round_offset: int = 0, reference: Path | None = None):
        self.aggregator, self.run, self.record, self.s, self.names = aggregator, run, record, s, names
        # A resumed run carries on from its last committed round: Flower counts from 1 again.
        self.round_offset = round_offset
        self.reference = reference  # a simulation's popularity baseline on its split
        self.exhausted: set[int] = set()  # nodes that declined for budget: never sampled again
        self.sent: dict = {}
        self.instructions: list[Message] = []
        self.row: dict = {}
        self.splits: list[str] = ["val"]
        self.started = time.time()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.round_offset
        try:
            self.s.check_population(len(list(grid.get_node_ids())))
        except ConfigError as e:
            raise RunStopped(f"round {server_round}: {e}") from None
        eligible = EligibleNodes(grid, self.exhausted)
        if (left := len(eligible.get_node_ids())) < self.s.min_train_nodes:
            raise RunStopped(f"round {server_round}: only {left} client(s) have privacy budget left "
                             f"({len(self.exhausted)} declined for budget); min-train-nodes is {self.s.min_train_nodes}")
        self.sent = arrays.to_torch_state_dict()
        self.instructions = list(self.aggregator.configure_train(server_round, arrays, config, eligible))
        return self.instructions

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = classify(replies, self.names, self.instructions, self.s.round_timeout)
        if not self.s.secure_aggregation:  # SecAgg+ replies carry the aggregate: no one client's update to check
            validate(replies, lambda msg: check_train_reply(msg.content, self.sent, self.s.max_update_norm), "update")
        self.record.replies("train", replies, num_examples=lambda r: round(r.metrics["num-examples"]),
                            update_norm=self.norm)
        self.exhausted |= {r.node for r in replies if r.status == "declined"}
        usable = self.usable(server_round, replies)
        arrays, metrics = self.aggregator.aggregate_train(server_round, [r.msg for r in usable])
        released = getattr(self.aggregator.strategy, "released", None)  # central DP's own release
        if released:
            self.record.server_release(released)
        self.row = train_row(server_round, replies, self.s, released["row"] if released else {})
        if arrays is not None:
            self.run.checkpoint(server_round, arrays, self.aggregator.state_dict())
        return arrays, metrics

    def norm(self, r: Reply) -> float | None:
        """L2 norm of a client's update; unknown under SecAgg+, which hides it."""
        if self.s.secure_aggregation:
            return None
        return update_norm(r.msg.content["arrays"].to_torch_state_dict(), self.sent)

    def usable(self, server_round: int, replies: list[Reply]) -> list[Reply]:
        """The accepted replies, in an order that does not depend on the network's; enough of them."""
        ok = accepted(replies)
        # Floating-point sums depend on the order: sorted by content, the same replies give the same bits.
        ok.sort(key=lambda r: content_digest(r.msg.content["arrays"]))
        if not self.s.central_dp and len(ok) < self.s.min_replies:  # central DP releases even an empty round
            problems = "; ".join(f"node {r.node}: {r.reason}" for r in replies if r.status != "accepted")
            raise RunStopped(f"round {server_round}: {len(ok)} usable repl{'y' if len(ok) == 1 else 'ies'}, fewer "
                             f"than min-replies = {self.s.min_replies}; the global adapter of round "
                             f"{server_round - 1} stands ({problems})")
        return ok

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        server_round += self.round_offset
        self.splits = evaluation_splits(server_round, self.s)
        config = ConfigRecord({**config, "splits": ",".join(self.splits)})
        return self.aggregator.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        noise_std = self.s.eval_noise_multiplier * eval_sensitivity(len(self.splits))
        replies = classify(replies, self.names)
        validate(replies, lambda msg: check_evaluate_reply(msg.content, noise_std, self.splits), "evaluation")
        self.record.replies("evaluate", replies)
        ok = accepted(replies)
        row = {"round": server_round, **self.row, **evaluation_row([r.metrics for r in ok], noise_std, self.splits),
               "client-evaluations": [{"node": r.node, "epsilon": finite_or_none(r.metrics["epsilon"]),
                                       "delta": r.metrics["delta"]} for r in ok]}
        if self.reference and self.reference.is_file():
            popularity = json.loads(self.reference.read_text())
            for split in self.splits:
                reference = popularity["valid" if split == "val" else split]  # simulations/partition.py's keys
                row.update({f"popularity-{EVAL_SPLITS[split]}{k}": v for k, v in reference.items()})
        row["elapsed-s"] = round(time.time() - self.started, 2)
        self.commit(server_round, row)
        return MetricRecord({k: v for k, v in row.items() if k.removeprefix("val-") in METRICS})

    def commit(self, server_round: int, row: dict) -> None:
        """The metrics row, then the ledger's transaction: the round's commit point."""
        self.run.append_row(row)
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "round"}
        self.record.commit(server_round, numbers)
        self.row = {}

    def summary(self) -> None:
        self.aggregator.summary()


def train_row(server_round: int, replies: list[Reply], s: Settings, central: dict) -> dict:
    """The train half of a round's metrics row: who did what, and the clients' ε."""
    clients = []
    for r in replies:
        if r.status == "failed":
            clients.append({"node": r.node, "error": r.reason})
        elif r.status == "rejected":
            clients.append({"node": r.node, "rejected": r.reason})
        elif r.status == "declined":
            clients.append({"node": r.node, **json_metrics(r.metrics), "decline-reason": r.reason})
        else:
            clients.append({"node": r.node, **json_metrics(r.metrics)})
    ok = [c for c, r in zip(clients, replies) if r.status == "accepted"]
    eps = [c["epsilon"] for c in ok if c["epsilon"] is not None]
    status = [r.status for r in replies]
    return {
        "round": server_round,
        "clients": len(ok),
        "declined": status.count("declined"),
        "failures": status.count("failed"),
        "rejected": status.count("rejected"),
        "epsilon-max": max(eps) if eps else None,
        "epsilon-median": statistics.median(eps) if eps else None,
        "delta": max((c["delta"] for c in ok), default=None) if s.dp else None,
        **central,
        "client-updates": clients,
    }


def evaluation_splits(server_round: int, s: Settings) -> list[str]:
    """What a round is scored on: validation every round; the test split too at the last round
    of a run with ``evaluate-test`` (a final configuration's, fixed before it starts). Choices
    (hyper-parameters, defaults, when to stop) are made on validation; the test figure is read
    once, for the round fixed in advance."""
    return ["val", "test"] if s.evaluate_test and server_round == s.num_server_rounds else ["val"]


def evaluation_row(replies: list[MetricRecord], noise_std: float, splits: list[str]) -> dict:
    """The round's metrics from the sites' evaluation releases, per split scored.

    DP estimate (any deployment): Σ noisy sums / Σ noisy counts per metric, clamped to [0, 1]
    (post-processing). Exact (simulation only, where every site sends exact means): the
    user-weighted mean. The row's keys (``val-ndcg@10``…; the test split's without a prefix,
    ``ndcg@10``…) hold the exact figures when every site sent them, else the DP estimates;
    ``metrics-source`` says which.
    """
    if not replies:
        return {}
    prefixes = [EVAL_SPLITS[split] for split in splits]
    row = {"eval-sites": len(replies), "eval-splits": ",".join(splits), "eval-noise-std-per-sum": noise_std}
    for prefix in prefixes:
        count = sum(m[f"{prefix}count"] for m in replies)
        row[f"dp-{prefix}eval-users"] = count
        for k in METRICS:
            row[f"dp-{prefix}{k}"] = min(1.0, max(0.0, sum(m[f"{prefix}sum-{k}"] for m in replies) / max(count, 1.0)))
    if all(f"exact-{prefix}{k}" in m for m in replies for prefix in prefixes for k in METRICS):
        for prefix in prefixes:
            users = sum(m[f"exact-{prefix}count"] for m in replies)
            row[f"{prefix}eval-users"] = int(users)
            row.update({f"{prefix}{k}": sum(m[f"exact-{prefix}{k}"] * m[f"exact-{prefix}count"] for m in replies)
                        / max(users, 1) for k in METRICS})
        row["metrics-source"] = "exact (simulation: the simulator owns every site's data); dp-* are the DP releases"
    else:
        for prefix in prefixes:
            row.update({f"{prefix}{k}": row[f"dp-{prefix}{k}"] for k in METRICS})
            row[f"{prefix}eval-users"] = round(row[f"dp-{prefix}eval-users"])
        row["metrics-source"] = "dp (Gaussian sums released by the sites)"
    return row


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = 600) -> list[int]:
    deadline = time.time() + timeout
    while len(nodes := list(grid.get_node_ids())) < minimum and time.time() < deadline:
        time.sleep(1)
    return nodes
