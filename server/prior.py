"""The DP popularity prior: ledger round 0, before any training.

The server asks every client for a histogram of its training targets, sums the ones that pass
their check, clamps at zero (post-processing) and sets the item bias to log(1 + Σ counts).
Under DP noise, learning this bias by DP-SGD alone takes far more steps. Two mechanisms:

* local (``dp = true``): each client adds N(0, σ_h²) to its own histogram (sensitivity 1 in its
  privacy unit) and its own accountant records the release;
* central (``central-dp = true``): each client sends its histogram scaled to L2 norm 1, the
  server clips it to 1 again, sums and adds N(0, σ_h²) once, in its client-level accountant.
  The noise does not grow with the number of clients, which one client per user needs;
* shared (``distributed-noise = true``): the histograms go through SecAgg+ as one round whose
  config names ``phase = prior``; each site adds N(0, σ_h²/T) to its own, so the sum the server
  unmasks carries σ_h once, as the central prior's does, with no site's histogram seen alone.

``prior.json`` says who answered.
"""

from __future__ import annotations

import json
import logging

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from common.config import Settings
from common.model import adapter_state, set_item_bias
from common.secure_aggregation import HISTOGRAM_UNIT, PRIOR_PHASE
from server.central_dp import ACCOUNTANT, ClientLevelDP
from server.records import RoundRecord, json_metrics
from server.replies import Names, accepted, classify, validate
from server.rounds import wait_for_nodes
from server.run_dir import RunDirectory
from server.validation import check_prior_reply

log = logging.getLogger("fedrec.server")


def popularity_prior(grid: Grid, model, checks: dict, s: Settings, run: RunDirectory, record: RoundRecord,
                     names: Names, central: ClientLevelDP | None = None) -> set[int]:
    """Set the global model's item bias from the clients' histograms, noised by each client or, with
    ``central``, by the server; commit round 0. Returns the nodes that declined for budget."""
    nodes = wait_for_nodes(grid, s.min_train_nodes)
    num_items = model.get_base_model().item_embeddings.shape[0]
    if s.distributed_noise:  # a SecAgg+ round (``grid`` is the SecureGrid) summing counts, not adapters
        config = {**checks, "server-round": 0, "phase": PRIOR_PHASE}
        messages = [Message(RecordDict({"arrays": ArrayRecord({"counts": torch.zeros(num_items)}),
                                        "config": ConfigRecord(config)}), dst_node_id=node,
                            message_type=MessageType.TRAIN) for node in nodes]
    else:
        messages = [Message(RecordDict({"config": ConfigRecord(checks)}), dst_node_id=node,
                            message_type="query.popularity") for node in nodes]
    replies = classify(grid.send_and_receive(messages, timeout=600), names)
    validate(replies, lambda msg: check_prior_reply(msg.content, num_items, s.prior_noise_multiplier),
             "popularity histogram")
    record.replies("prior", replies)
    ok = accepted(replies)
    (run.path / "prior.json").write_text(json.dumps({
        "asked": len(nodes), "answered": len(ok), "noise-multiplier": s.prior_noise_multiplier if s.dp else 0.0,
        "errors": [r.reason for r in replies if r.status == "failed"],
        "declined": [r.reason for r in replies if r.status == "declined"],
        "rejected": [{"node": r.node, "rejected": r.reason} for r in replies if r.status == "rejected"],
        "client-updates": [{"node": r.node, **json_metrics(r.metrics)} for r in ok]}, indent=1))
    histograms = [r.msg.content["arrays"].to_torch_state_dict()["counts"] for r in ok]
    if central is not None and ok:
        set_item_bias(model, central.noisy_histogram_sum(histograms, s.prior_noise_multiplier))
        record.server_release(central_prior_release(central, s.prior_noise_multiplier, len(ok)))
    elif s.distributed_noise and ok:  # each survivor's reply carries the mean of the K shares, in thousands
        set_item_bias(model, histograms[0] * len(ok) / HISTOGRAM_UNIT)
    elif ok:
        set_item_bias(model, sum(histograms))
    else:
        log.warning("popularity prior: no client answered; starting from a zero bias")
    run.checkpoint(0, ArrayRecord(adapter_state(model)))
    declined = {r.node for r in replies if r.status == "declined"}
    record.commit(0, {"answered": len(ok), "declined": len(declined)})
    return declined


def central_prior_release(central: ClientLevelDP, noise_multiplier: float, answered: int) -> dict:
    """The ledger rows of the central prior: one Gaussian release over every client, sensitivity 1."""
    eps = central.accountant.get_epsilon(central.delta)
    return {"participant": {"node": "server", "phase": "prior", "status": "released", "num_examples": answered,
                            "epsilon": eps, "delta": central.delta},
            "mechanism": {"node": "server", "phase": "prior", "mechanism": "client-level-gaussian-histogram",
                          "noise_multiplier": noise_multiplier, "sample_rate": 1.0, "steps": 1, "max_grad_norm": 1.0,
                          "delta": central.delta, "accountant": ACCOUNTANT}}
