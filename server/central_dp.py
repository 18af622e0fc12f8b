"""Client-level (user-level) central DP at the server: DP-FedAvg with a fixed denominator.

Mechanism, per round (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models"):

    every client joins the round independently with probability q = m / N (Poisson sampling)
    each participant's update Δ_k = θ_k − θ is clipped to L2 norm C over all adapter tensors
    the server releases  θ + η_s · (Σ_k clip_C(Δ_k) + N(0, z²C²·I)) / m

``m`` (the expected number of clients per round) is a constant: dividing by the number that
actually replied would make the sensitivity depend on who replied, and weighting by example
counts would let one client's weight grow without bound. With equal weights and a fixed
denominator the sum has L2 sensitivity C under adding or removing one client, so each round
is the Poisson-subsampled Gaussian mechanism with noise multiplier z. A client that declines,
fails or is dropped contributes 0, which lies inside the clipping ball: the bound still holds.
Multiplying by η_s and adding θ are post-processing.

Unit of privacy: all the data of one client (add/remove adjacency). Trust model: the server
sees each client's update and is trusted to clip and add the noise; everyone who sees only the
global adapters is covered. This guarantee is separate from the example-level one each
client's DP-SGD gives (``common/privacy.py``); the two are never added and neither amplifies
the other.

Accounting: Flower's ``RdpAccountant`` (Google's dp-accounting RDP inside) with Poisson
sampling and add/remove-one neighbouring populations. ``fedrec audit`` recomputes it with
Opacus' RDP accountant, which shares no code with it.
"""

from __future__ import annotations

import math
import random
import secrets
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                               SamplingMethod)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

ACCOUNTANT = "flwr-rdp"  # as written in the ledger; the audit recomputes it with Opacus' RDP


class ClientLevelDP:
    """Poisson client sampling, per-client clipping, Gaussian noise on the sum, and its accountant.

    ``delta`` must be below 1/N (``Settings.check_population``): a larger δ allows a mechanism
    that publishes one client's data outright.
    """

    def __init__(self, noise_multiplier: float, clipping_norm: float, delta: float, population: int,
                 expected_clients: int, generator: torch.Generator | None = None):
        if not 1 <= expected_clients <= population:
            raise ValueError(f"expected clients per round must be in [1, {population}], got {expected_clients}")
        self.noise_multiplier, self.clipping_norm, self.delta = noise_multiplier, clipping_norm, delta
        self.population, self.expected_clients = population, expected_clients
        self.sample_rate = expected_clients / population
        # Sampling and noise are part of the mechanism: both come from the OS entropy pool.
        self.sampler = random.SystemRandom()
        self.generator = generator or torch.Generator().manual_seed(secrets.randbits(63))
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE, sampling_method=SamplingMethod.POISSON))
        self.event = GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=expected_clients,
                                          population_size=population)

    def sample(self, nodes: list[int]) -> list[int]:
        """Each node independently with probability q (a node left out for budget has probability 0 ≤ q)."""
        return [n for n in nodes if self.sampler.random() < self.sample_rate]

    def noisy_mean_update(self, sent: dict[str, torch.Tensor], received: list[dict[str, torch.Tensor]],
                          trained: set[str]):
        """(Σ_k clip_C(Δ_k) + N(0, z²C²·I)) / m over the ``trained`` adapter tensors; 0 for the rest.

        Tensors the run keeps frozen (e.g. LoRA's A under FFA-LoRA) are neither taken from the
        clients nor noised: they are public and fixed, and noise there would only destroy them.
        """
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in sent.items() if k in trained}
        for state in received:
            delta = {k: state[k].double() - sent[k].double() for k in total}
            norm = math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
            factor = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            for k in total:
                total[k] += factor * delta[k]
        std = self.noise_multiplier * self.clipping_norm
        for k in total:
            total[k] += std * torch.randn(total[k].shape, dtype=torch.float64, generator=self.generator)
        return {k: (total[k] / self.expected_clients).to(v.dtype) if k in total else torch.zeros_like(v)
                for k, v in sent.items()}

    def compose(self, noise_multiplier: float, sample_rate: float) -> None:
        """Add one recorded release to the accountant: a round (rate q = m/N) or, at rate 1, the
        prior (a Gaussian on the sum of every client's unit-norm histogram)."""
        if sample_rate < 1.0:
            self.accountant.compose(self.event)
        else:
            self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier,
                                                         sample_size=self.population, population_size=self.population))

    def noisy_histogram_sum(self, histograms: list[torch.Tensor], noise_multiplier: float) -> torch.Tensor:
        """Σ_k h_k / max(1, ‖h_k‖) + N(0, σ_h²·I), and its release accounted: the popularity prior
        under central DP. Every client asked (q = 1) adds at most 1 in L2, so σ_h is the noise
        multiplier whatever the number of clients; the server clips, as it does updates."""
        total = torch.zeros_like(histograms[0], dtype=torch.float64) if histograms else None
        for h in histograms:
            total += h.double() / max(1.0, float(h.double().norm()))
        total += noise_multiplier * torch.randn(total.shape, dtype=torch.float64, generator=self.generator)
        self.compose(noise_multiplier, 1.0)
        return total.float()

    def release(self) -> float:
        """Record one round's release with the accountant; the cumulative ε at ``delta``."""
        self.accountant.compose(self.event)
        return self.accountant.get_epsilon(self.delta)


class CentralDP(FedAvg):
    """Flower's FedAvg with central DP's sampling and aggregate in place of its own.

    ``configure_train`` samples by Poisson, as the accountant assumes (no fixed count, no
    minimum); ``aggregate_train`` returns θ + (Σ_k clip_C(Δ_k) + N(0, z²C²·I)) / m and records the
    release, so ``released`` holds this round's ledger rows. Evaluation is FedAvg's.
    """

    def __init__(self, mechanism: ClientLevelDP, trained: Callable[[str], bool], **fedavg):
        super().__init__(**fedavg)
        self.mechanism, self.trained = mechanism, trained
        self.sent: dict[str, torch.Tensor] = {}
        self.released: dict | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.sent = arrays.to_torch_state_dict()
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in self.mechanism.sample(list(grid.get_node_ids()))]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        update = self.mechanism.noisy_mean_update(
            self.sent, [m.content["arrays"].to_torch_state_dict() for m in replies],
            {k for k in self.sent if self.trained(k)})
        arrays = ArrayRecord({k: self.sent[k] + update[k] for k in self.sent})
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key) if replies else None
        eps, dp = self.mechanism.release(), self.mechanism
        self.released = {
            "row": {"central-epsilon": eps, "central-delta": dp.delta, "central-clients": len(replies)},
            "participant": {"node": "server", "phase": "central", "status": "released", "num_examples": len(replies),
                            "epsilon": eps, "delta": dp.delta},
            "mechanism": {"node": "server", "phase": "central", "mechanism": "client-level-gaussian",
                          "noise_multiplier": dp.noise_multiplier, "sample_rate": dp.sample_rate, "steps": 1,
                          "max_grad_norm": dp.clipping_norm, "delta": dp.delta, "accountant": ACCOUNTANT},
        }
        return arrays, metrics
