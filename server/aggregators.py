"""The aggregate step: the one aggregator a run chooses at start, behind Flower's Strategy interface.

Each is a Flower strategy; the server's optimizer wraps it the way Flower's own DP strategies
wrap another (``ServerStep``: a step of size η_s toward the aggregate; ``ServerAdam``: Adam on
the difference, ``server-optimizer = adam``):

    fedavg        Flower's FedAvg: the example-weighted mean of the adapters
    median        Flower's FedMedian: the coordinate-wise median
    trimmed-mean  Flower's FedTrimmedAvg: per coordinate, the ``trim-fraction`` largest and
                  smallest dropped, the rest averaged
    multi-krum    Flower's MultiKrum: the ``krum-select`` adapters closest to their n − f − 2
                  nearest others (f = ``krum-malicious``), averaged; 0 selects n − f
    central DP    server/central_dp.py: Poisson client sampling, each update clipped, Gaussian
                  noise on the sum, a fixed denominator
    SecAgg+       ``SecureSum``: the replies carry the sum SecAgg+ unmasked, not one client's adapter

``choose`` picks one from the settings; ``Settings`` has refused the combinations that do not
compose (e.g. robust aggregation or central DP under SecAgg+).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, MultiKrum, Strategy

from common.config import Settings
from common.model import is_trained
from server.central_dp import CentralDP, ClientLevelDP


class ServerStep(Strategy):
    """global ← global + η_s · (the wrapped strategy's aggregate − global).

    η_s = 1 is the wrapped strategy itself. η_s > 1 lets clients take small local steps under
    their own DP noise while the server scales up the averaged update, whose noise is √K smaller
    than any one client's (FedAvgM without momentum; Reddi et al. 2021).
    """

    def __init__(self, strategy: FedAvg, server_learning_rate: float):
        self.strategy, self.server_learning_rate = strategy, server_learning_rate
        self.sent: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.sent = arrays.to_torch_state_dict()
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or self.server_learning_rate == 1.0:
            return arrays, metrics
        aggregate = arrays.to_torch_state_dict()
        eta = self.server_learning_rate
        return ArrayRecord({k: v + eta * (aggregate[k] - v) for k, v in self.sent.items()}), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    def state_dict(self) -> dict | None:
        """The server optimizer's state to checkpoint with the round's adapter: none for a plain step."""
        return None


class ServerAdam(ServerStep):
    """global ← Adam(global; gradient = global − the wrapped strategy's aggregate), step size η_s.

    FedAdam (Reddi et al., ICLR 2021), with torch's Adam (bias-corrected, β = (0.9, 0.999),
    ε = 1e-8). Under ``distributed-noise`` each site sends θ − g_k, one step of its noisy gradient,
    and the aggregate is θ − ḡ: the pooled sites' noisy gradient, so this is DP-Adam over the
    pooled sites, post-processing of the released sum. Its moments are the server's state: they
    are saved with each round's adapter (``state_dict``) so a resumed run steps as it would have.
    """

    def __init__(self, strategy: FedAvg, server_learning_rate: float):
        super().__init__(strategy, server_learning_rate)
        self.params: dict[str, torch.nn.Parameter] = {}
        self.optimizer: torch.optim.Adam | None = None
        self.saved_state: dict | None = None  # a resumed run's moments, loaded at the first step

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        aggregate = arrays.to_torch_state_dict()
        if self.optimizer is None:
            self.params = {k: torch.nn.Parameter(v.detach().clone().float()) for k, v in self.sent.items()}
            self.optimizer = torch.optim.Adam(self.params.values(), lr=self.server_learning_rate)
            if self.saved_state is not None:
                self.optimizer.load_state_dict(self.saved_state)
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.sent[k])
                p.grad = (self.sent[k] - aggregate[k]).float()
        self.optimizer.step()
        return ArrayRecord({k: p.detach().to(self.sent[k].dtype).clone() for k, p in self.params.items()}), metrics

    def state_dict(self) -> dict | None:
        # A copy: torch's optimizer hands out its live moments, which its next step changes in place.
        return copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None

    def load_state_dict(self, state: dict) -> None:
        self.saved_state = state


class SecureSum(FedAvg):
    """Under SecAgg+ every reply carries the same unmasked aggregate Σ n_k θ_k / Σ n_k
    (server/secure_aggregation.py): it is the result."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        if not replies:
            return None, None
        aggregate = replies[0].content["arrays"]
        if any(content_digest(r.content["arrays"]) != content_digest(aggregate) for r in replies[1:]):
            raise RuntimeError("SecAgg+ replies carry different aggregates")
        return aggregate, self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key)


class KrumAllButMalicious(MultiKrum):
    """MultiKrum selecting n − f of the n replies it gets (``krum-select = 0``)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


def choose(s: Settings, population: int) -> ServerStep:
    """The run's aggregator, with its sampling (Flower's FedAvg sampling, or central DP's Poisson)."""
    common = {"fraction_train": s.fraction_train, "fraction_evaluate": s.fraction_evaluate,
              "min_train_nodes": s.min_train_nodes, "min_available_nodes": s.min_train_nodes,
              "min_evaluate_nodes": min(s.min_train_nodes, max(1, population)),
              "train_metrics_aggr_fn": aggregate_train_metrics}
    if s.central_dp:
        mechanism = ClientLevelDP(s.central_noise_multiplier, s.central_clipping_norm, s.central_delta,
                                  population, s.expected_clients(population))
        aggregator = CentralDP(mechanism, lambda key: is_trained(key, s), **common)
    elif s.secure_aggregation:
        aggregator = SecureSum(**common)
    elif s.aggregation == "median":
        aggregator = FedMedian(**common)
    elif s.aggregation == "trimmed-mean":
        aggregator = FedTrimmedAvg(beta=s.trim_fraction, **common)
    elif s.aggregation == "multi-krum" and s.krum_select == 0:
        aggregator = KrumAllButMalicious(num_malicious_nodes=s.krum_malicious, **common)
    elif s.aggregation == "multi-krum":
        aggregator = MultiKrum(num_malicious_nodes=s.krum_malicious, num_nodes_to_select=s.krum_select, **common)
    else:
        aggregator = FedAvg(**common)
    return (ServerAdam if s.server_optimizer == "adam" else ServerStep)(aggregator, s.server_learning_rate)


def aggregate_train_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Training metrics across clients: the (noisy) example total, and ε as a maximum, never a
    mean (an average ε is no one's guarantee). No loss: the sites do not release one."""
    metrics = [r["metrics"] for r in replies]
    return MetricRecord({
        weight_key: sum(m[weight_key] for m in metrics),
        "epsilon-max": max(m["epsilon"] for m in metrics),
        "delta": max(m["delta"] for m in metrics),
    })


def content_digest(arrays: ArrayRecord) -> str:
    return hashlib.sha256(b"".join(arrays[k].data for k in sorted(arrays))).hexdigest()
