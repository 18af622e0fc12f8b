"""Secure aggregation with Flower's SecAgg+ (``secure-aggregation = true``).

With SecAgg+ the server learns only the example-weighted sum of the clients' adapters, never
one client's: each client quantizes ``n_k · θ_k / max_weight`` to integers, adds pairwise masks
that cancel in the sum and a private mask whose seed is secret-shared among the others, and the
server unmasks only the total (Bonawitz et al. 2017; Bell et al. 2020). Flower runs the protocol
(``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the client); this module lets it
serve the train phase of the same round pipeline (server/rounds.py) every other run uses.

How: ``SecureGrid`` wraps the Grid. When the strategy sends its TRAIN messages, the grid runs
the four SecAgg+ stages with those nodes and that global adapter instead, and hands the
strategy one reply per surviving client that carries the *aggregate* (Σ n_k θ_k / Σ n_k) and
that client's own declared metrics (ε, the noisy count); the aggregator ``SecureSum``
(server/aggregators.py) takes it, so the server learning rate η_s, the ledger and the run
directory are unchanged. This is the device Flower's own legacy strategy bridge uses. Before the
protocol starts, each sampled client is asked the round's price (``query.price``): a budget
decline is then a decline like any other, not a dropout.

What it costs: each client's ``n_k/W · θ_k`` is clipped to ``±secagg-clipping-range`` (r) and
rounded stochastically to ``2^22`` levels, so the aggregate differs from plain FedAvg by less
than ``K · 2r / 2^22 / Σ_k (n_k / W)`` per coordinate, W = ``secagg-max-weight``
(``tests/test_secure_aggregation.py`` checks this bound). W must be at least the largest
client's example count (a larger client refuses the round rather than overflow); the closer W
is to the clients' counts, the finer the result.

What combines with it: client-side DP-SGD (each client clips and noises before masking) and the
per-client budgets. What cannot: anything that needs one client's update at the server —
central DP's per-client clipping (``central-dp``), per-update norms in the ledger (recorded as
absent), robust aggregation. ``Settings`` refuses those combinations before a run starts. The
DP popularity prior's histograms are not masked: each is Gaussian-noised by its client and
accounted, and ``popularity-prior = false`` removes them. Under ``distributed-noise`` they are:
the prior is a SecAgg+ round of its own (server/prior.py), each site adding its share of σ_h.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from common.secure_aggregation import ADAPTER_KEYS, SECURE_ERROR
from server.replies import is_decline

log = logging.getLogger("fedrec.server")


class _Relay(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow drives: it samples exactly the nodes the real
    strategy chose, and captures the unmasked aggregate."""

    def __init__(self, grid: Grid, run_id: int, messages: list[Message], keys: list[str]):
        self.grid, self.run_id, self.messages, self.keys = grid, run_id, messages, keys
        self.results: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        config = dict(self.messages[0].content["config"])
        config[ADAPTER_KEYS] = "\n".join(self.keys)  # legacy config values are scalars, not lists
        return [(GridClientProxy(m.metadata.dst_node_id, self.grid, self.run_id), FitIns(parameters, config))
                for m in self.messages]

    def aggregate_fit(self, server_round, results, failures):
        self.results = results
        return (results[0][1].parameters if results else None), {}

    # The rest of the legacy interface is not used by the fit workflow.
    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SecureGrid:
    """A Grid whose TRAIN round trip is one SecAgg+ run; every other message passes through."""

    def __init__(self, grid: Grid, context, workflow: SecAggPlusWorkflow):
        self.grid, self.context, self.workflow = grid, context, workflow

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self.grid.send_and_receive(messages, timeout=timeout)
        declines = self.declines(messages, timeout)
        taking_part = [m for m in messages if m.metadata.dst_node_id not in declines]
        replies = [Message(declines[m.metadata.dst_node_id].content, reply_to=m)
                   for m in messages if m.metadata.dst_node_id in declines]
        return replies + (self.secure_round(taking_part) if taking_part else [])

    def declines(self, messages: list[Message], timeout) -> dict[int, Message]:
        """Each node's well-formed budget decline of this train round, asked before SecAgg+ starts.

        The protocol has no place for a decline: a client that refuses inside it is a dropout,
        recorded as failed and sampled again. So the round's price is asked first
        (``query.price``, answered from public numbers and the site's own accountant)."""
        asks = [Message(RecordDict({"config": m.content["config"]}), dst_node_id=m.metadata.dst_node_id,
                        message_type="query.price") for m in messages]
        return {r.metadata.src_node_id: r for r in self.grid.send_and_receive(asks, timeout=timeout)
                if is_decline(r)}

    def secure_round(self, messages: list[Message]) -> list[Message]:
        sent: dict = messages[0].content["arrays"].to_torch_state_dict()
        keys = list(sent)
        server_round = int(messages[0].content["config"]["server-round"])
        relay = _Relay(self.grid, self.context.run_id, messages, keys)
        legacy = LegacyContext(self.context, strategy=relay, client_manager=SimpleClientManager())
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([sent[k].numpy() for k in keys]), keep_input=True)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
        self.workflow(self.grid, legacy)
        by_node = {proxy.node_id: fitres for proxy, fitres in relay.results}
        replies = []
        for msg in messages:
            fitres = by_node.get(msg.metadata.dst_node_id)
            if fitres is None:
                reason = (f"{SECURE_ERROR}: this client did not complete SecAgg+ (an error, a timeout, or the "
                          "protocol halted with too few survivors)")
                replies.append(Message(error=Error(code=0, reason=reason), reply_to=msg))
                continue
            arrays = parameters_to_ndarrays(fitres.parameters)
            aggregate = ArrayRecord({k: _like(sent[k], a) for k, a in zip(keys, arrays, strict=True)})
            # The client's accountant history came as JSON text (legacy metrics are scalars).
            metrics = MetricRecord({k: json.loads(v) if isinstance(v, str) else v for k, v in fitres.metrics.items()
                                    if isinstance(v, (int, float, str))})
            replies.append(Message(RecordDict({"arrays": aggregate, "metrics": metrics}), reply_to=msg))
        return replies


def _like(reference, array):
    import torch

    return torch.from_numpy(array.copy()).to(reference.dtype).reshape(reference.shape)
