"""The client half of SecAgg+: Flower's ``secaggplus_mod``, between the wire and ``train``.

SecAgg+ rounds arrive as TRAIN messages in Flower's legacy ``FitIns`` form with a
``secaggplus_configs`` record; ``secaggplus_mod`` runs the key agreement and masking stages and,
in the stage that collects masked vectors, calls the ClientApp's ``train`` once. This mod turns
that call into an ordinary fedrec train message (named adapter tensors + config) and the reply
back into the ``FitRes`` the masking expects: the adapter in the server's tensor order, the
example count as the weight, and the declared metrics. Any other message passes straight through.

While ``train`` runs inside the protocol, ``inside_secure_sum()`` gives the protocol's public
parameters (its threshold T: no sum of fewer than T clients' masked vectors is unmasked; its
quantization grid): a ``distributed-noise`` round adds its share of the noise only then, never
outside SecAgg+. The marker is this process's own state, which no message can set.

A budget decline is given before the protocol starts, to the server's ``query.price``; should
``train`` still decline here, the mod raises, SecAgg+ treats the client as a dropout and recovers
its masks, and it releases nothing.
"""

from __future__ import annotations

import contextvars
import json
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common import recorddict_compat as compat

from common.secure_aggregation import ADAPTER_KEYS


@dataclass(frozen=True)
class SecureSum:
    """The running SecAgg+ protocol's public parameters, as its setup stage gave them."""

    threshold: int  # T: no sum of fewer than T clients' masked vectors is unmasked
    sites: int  # the clients sampled into the protocol: at most this many vectors are summed
    clipping_range: float  # r: each value is clipped to ±r ...
    levels: int  # ... and rounded stochastically to one of `levels` steps of 2r / levels
    max_weight: float  # W: a client's vector is scaled by round(weight / W · levels) / levels first


_protocol: contextvars.ContextVar[SecureSum | None] = contextvars.ContextVar("secure_sum", default=None)


def inside_secure_sum() -> SecureSum | None:
    """SecAgg+'s parameters while ``train`` runs inside the protocol; None otherwise."""
    return _protocol.get()


QUANTIZATION_SLACK_MAX = 1e-30  # a share whose quantization_slack is larger is not sent


def quantization_slack(protocol: SecureSum, noise_std: float, largest: float, coordinates: int) -> float:
    """τ: a bound on the total variation distance between what the server sees of one
    distributed-noise round and a post-processing of the real-valued Gaussian sum the
    accountant charges, for any data. The round's (ε, δ) then holds with δ + (1 + e^ε)·τ, and a
    run's R rounds with δ + (1 + e^ε)·Σ τ (a hybrid argument over the rounds).

    Why there is a gap: SecAgg+ clips each site's noisy value y_k to ±r and rounds it
    stochastically to its grid, so the server sees Σ_k Q(y_k), not Σ_k y_k, and rounding each
    noisy share is not a function of their sum. Per coordinate, in grid units, with s this site's
    noise std there and K ≤ ``sites`` vectors summed (all the sites add the same share):

    * rounding: Q(y) = j with probability E[Λ(y − j)], Λ(t) = max(0, 1 − |t|), so Σ_k Q(y_k) has
      the pmf of the convolution of the h_k = φ_s(· − μ_k) ∗ Λ *sampled at the integers*, while
      Q(W + T_2 + … + T_K) (W the Gaussian sum, T_k independent with density Λ: a
      post-processing of W) has the pmf of their convolution, sampled. By Poisson summation the
      two pmfs' Fourier series differ by at most γ = (1 + β)^K − 1 + β on [−π, π], β =
      2e^{−c}/(1 − e^{−2c}), c = π²s²/2 (the Gaussian's spectrum beyond ±π), so each pmf value
      by at most γ; within w = K + 30·s·√K of the mean that is (2w + 1)·γ in L1, and both put
      at most 2e^{−450} outside it (the noise sum's tail; each rounding moves a value by < 1);
    * clipping: each of the K sites' values stays within ±r unless its noise exceeds the margin
      r − max|μ| (``largest`` bounds |μ|, the value before the noise, in the sent units):
      probability ≤ 2·exp(−margin² / (2·noise_std²)) per coordinate and site.

    τ = coordinates · (½·L1 + K·clip) over the trained coordinates (the others carry no noise
    and no data: their rounding is data-independent). The rounding's coin flips are taken as
    unknown to the server: Flower draws them from numpy's global generator, which is seeded from
    the OS at import and which neither Flower nor fedrec reseeds."""
    scale = round(1.0 / protocol.max_weight * protocol.levels) / protocol.levels  # the weight-1 vector's factor
    step = 2 * protocol.clipping_range / protocol.levels
    sites, s = protocol.sites, scale * noise_std / step
    margin = protocol.clipping_range - scale * largest
    if s <= 0 or margin <= 0:
        return math.inf
    c = math.pi ** 2 * s ** 2 / 2
    beta = 2 * math.exp(-c) / -math.expm1(-2 * c)
    gamma = math.expm1(sites * math.log1p(beta)) + beta
    width = sites + 30 * s * math.sqrt(sites)
    l1 = (2 * width + 1) * gamma + 4 * math.exp(-450)
    clip = 2 * math.exp(-margin ** 2 / (2 * (scale * noise_std) ** 2))
    return coordinates * (l1 / 2 + sites * clip)


def secure_aggregation_mod(msg: Message, context, call_next):
    if msg.metadata.message_type != "train" or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def train_as_fit(fit_msg: Message, ctx) -> Message:
        fitins = compat.recorddict_to_fitins(fit_msg.content, keep_input=True)
        keys = str(fitins.config.pop(ADAPTER_KEYS)).split("\n")
        arrays = parameters_to_ndarrays(fitins.parameters)
        if len(keys) != len(arrays):
            raise ValueError(f"SecAgg+ round: {len(arrays)} tensors for {len(keys)} adapter names")
        state = OrderedDict((k, torch.from_numpy(a.copy())) for k, a in zip(keys, arrays))
        content = RecordDict({"arrays": ArrayRecord(state),
                              "config": ConfigRecord(dict(fitins.config))})
        protocol = ctx.state.config_records[RECORD_KEY_STATE]  # set in SETUP
        marker = _protocol.set(SecureSum(int(protocol["threshold"]), int(protocol["sample_num"]),
                                         float(protocol["clipping_range"]), int(protocol["target_range"]),
                                         float(protocol["max_weight"])))
        try:
            reply = call_next(Message(content=content, metadata=fit_msg.metadata), ctx)
        finally:
            _protocol.reset(marker)
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        if "decline" in reply.content:
            raise RuntimeError(str(reply.content["decline"]["reason"]))
        trained = reply.content["arrays"]
        if sorted(trained.keys()) != sorted(keys):
            raise ValueError("SecAgg+ round: this client's adapter tensors differ from the server's")
        metrics = dict(reply.content["metrics"])
        max_weight = float(protocol["max_weight"])
        if metrics["num-examples"] > max_weight:  # its values would overflow the quantization range
            raise ValueError(f"SecAgg+ round: this client has {int(metrics['num-examples'])} training examples, "
                             f"more than secagg-max-weight = {max_weight:g}; raise secagg-max-weight")
        # Flower's quantization mishandles 0-d arrays (the score scale): send them as shape (1,);
        # the server restores every tensor's shape from the adapter it sent.
        arrays = [np.atleast_1d(trained[k].numpy()) for k in keys]
        # Legacy FitRes metrics are scalars: the accountant history travels as JSON text.
        metrics = {k: json.dumps(v) if isinstance(v, list) else v for k, v in metrics.items()}
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), int(metrics["num-examples"]), metrics)
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=fit_msg)

    return secaggplus_mod(msg, context, train_as_fit)
