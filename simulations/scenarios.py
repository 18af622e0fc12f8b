"""Faulty and adversarial clients, for robustness studies in simulation.

    fedrec simulate --scenario 0:sign-flip 1:scale --set aggregation=median

runs the real ClientApp everywhere, except that the listed partitions misbehave in their train
replies (their training, budget and ε are real; only what they send is altered):

    raise      the ClientApp raises (a crash)
    sleep      the reply comes after ``FEDREC_SCENARIO_SLEEP`` seconds (default 30): a hang
    nan        one adapter value is NaN
    shape      one adapter tensor loses its last row
    extra      an extra tensor rides along
    huge       the update θ_k − θ is multiplied by 1,000
    scale      the update is multiplied by 10 (a boosting attacker)
    sign-flip  the update is multiplied by −10: one such client in five outweighs the other four
               and FedAvg moves the model backwards
    prior-nan  its popularity histogram (round 0) carries a NaN
    prior-shape  its popularity histogram loses its last item
    under-noise  its DP-SGD adds noise σ·0.3 while it records and reports σ (a client that lies
               about its noise: its ledger rows, accountant and ε all say σ)
    no-noise   the same with no noise at all (the σ = 0 control of the canary audit)

The scenario travels to the simulated clients in the ``FEDREC_SCENARIO`` environment variable.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp

from client import client_app as real

BEHAVIOURS = ("raise", "sleep", "nan", "shape", "extra", "huge", "scale", "sign-flip", "prior-nan", "prior-shape",
              "under-noise", "no-noise")
NOISE_ADDED = {"under-noise": 0.3, "no-noise": 0.0}  # the fraction of the recorded σ really added
ENV = "FEDREC_SCENARIO"


def parse(items: list[str]) -> dict[int, str]:
    """``["0:nan", "3:sign-flip"]`` as {partition: behaviour}; a ValueError names a bad item."""
    scenario = {}
    for item in items:
        partition, sep, behaviour = item.partition(":")
        if not sep or not partition.isdigit() or behaviour not in BEHAVIOURS:
            raise ValueError(f"--scenario {item!r}: expected PARTITION:BEHAVIOUR with BEHAVIOUR one of "
                             f"{', '.join(BEHAVIOURS)}")
        scenario[int(partition)] = behaviour
    return scenario


def misbehave(msg: Message, context, call_next) -> Message:
    scenario = parse(os.environ.get(ENV, "").split()) if os.environ.get(ENV) else {}
    behaviour = scenario.get(int(context.node_config.get("partition-id", -1)))
    if msg.metadata.message_type == "query.popularity" and behaviour in ("prior-nan", "prior-shape"):
        reply = call_next(msg, context)
        counts = reply.content["arrays"].to_torch_state_dict()["counts"].clone()
        if behaviour == "prior-nan":
            counts[0] = float("nan")
        reply.content["arrays"] = ArrayRecord({"counts": counts if behaviour == "prior-nan" else counts[:-1]})
        return reply
    if msg.metadata.message_type != "train" or behaviour is None or behaviour.startswith("prior-"):
        return call_next(msg, context)
    if behaviour in NOISE_ADDED:
        return with_less_noise(msg, context, call_next, NOISE_ADDED[behaviour])
    if behaviour == "raise":
        raise RuntimeError("scenario: this client crashes")
    if behaviour == "sleep":
        time.sleep(float(os.environ.get("FEDREC_SCENARIO_SLEEP", "30")))
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content:
        return reply
    sent = msg.content["arrays"].to_torch_state_dict()
    arrays = reply.content["arrays"].to_torch_state_dict()
    first = next(iter(arrays))
    if behaviour == "nan":
        arrays[first].view(-1)[0] = float("nan")
    elif behaviour == "shape":
        arrays[first] = arrays[first][:-1].clone()
    elif behaviour == "extra":
        arrays["base_model.model.extra.weight"] = torch.zeros(3)
    elif behaviour in ("huge", "scale", "sign-flip"):
        factor = {"huge": 1000.0, "scale": 10.0, "sign-flip": -10.0}[behaviour]
        arrays = {k: sent[k] + factor * (v - sent[k]) for k, v in arrays.items()}
    reply.content["arrays"] = ArrayRecord(arrays)
    return reply


def with_less_noise(msg: Message, context, call_next, fraction: float) -> Message:
    """The real train step with an Opacus optimizer that adds σ·fraction while everything else
    (the accountant, the reply, the ledger) sees σ. A Ray worker runs one message at a time, so
    swapping the class for this call touches no other client."""
    from opacus.optimizers import DPOptimizer

    from client import train as training

    class LessNoise(DPOptimizer):
        def __init__(self, *args, noise_multiplier: float, **kwargs):
            super().__init__(*args, noise_multiplier=noise_multiplier * fraction, **kwargs)

    training.DPOptimizer = LessNoise
    try:
        return call_next(msg, context)
    finally:
        training.DPOptimizer = DPOptimizer


app = ClientApp(mods=[real.secure_aggregation_mod, misbehave])
app.train()(real.train)
app.evaluate()(real.evaluate)
app.query("popularity")(real.popularity)
app.query("price")(real.price)
