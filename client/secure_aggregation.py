"""The client half of SecAgg+: Flower's ``secaggplus_mod``, between the wire and ``train``.

SecAgg+ rounds arrive as TRAIN messages in Flower's legacy ``FitIns`` form with a
``secaggplus_configs`` record; ``secaggplus_mod`` runs the key agreement and masking stages and,
in the stage that collects masked vectors, calls the ClientApp's ``train`` once. This mod turns
that call into an ordinary fedrec train message (named adapter tensors + config) and the reply
back into the ``FitRes`` the masking expects: the adapter in the server's tensor order, the
example count as the weight, and the declared metrics. Any other message passes straight through.

While ``train`` runs inside the protocol, ``inside_secure_sum()`` gives the protocol's threshold
T (no sum of fewer than T clients' masked vectors is unmasked): a ``distributed-noise`` round
adds its share of the noise only then, never outside SecAgg+. The marker is this process's own
state, which no message can set.

A budget decline is given before the protocol starts, to the server's ``query.price``; should
``train`` still decline here, the mod raises, SecAgg+ treats the client as a dropout and recovers
its masks, and it releases nothing.
"""

from __future__ import annotations

import contextvars
import json
from collections import OrderedDict

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

_threshold: contextvars.ContextVar[int | None] = contextvars.ContextVar("secure_sum_threshold", default=None)


def inside_secure_sum() -> int | None:
    """SecAgg+'s threshold T while ``train`` runs inside the protocol; None otherwise."""
    return _threshold.get()


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
        marker = _threshold.set(int(protocol["threshold"]))
        try:
            reply = call_next(Message(content=content, metadata=fit_msg.metadata), ctx)
        finally:
            _threshold.reset(marker)
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
