"""Every client reply is checked before it can touch the global adapter.

A reply to a train message must carry exactly the adapter the server sent — the same tensor
names, count, shapes and dtypes — with every value finite, an update (θ_k − θ) whose L2 norm is
at most ``max-update-norm``, and the declared metrics with their declared types. Anything else
is dropped with the first reason found; the reason goes to ``metrics.jsonl`` and the ledger.
The check needs each client's update, so it cannot run under SecAgg+ (which hides them);
there, the protocol's own clipping to ``±secagg-clipping-range`` bounds each contribution.
"""

from __future__ import annotations

import math

import torch
from flwr.app import RecordDict

# What a trained reply declares, and the type each value must have.
TRAIN_METRICS = {
    "num-examples": int, "train-loss": float, "epsilon": float, "delta": float, "steps": int,
    "sample-rate": float, "noise-multiplier": float, "max-grad-norm": float, "epsilon-max": float, "declined": int,
    "client-id": int, "history-noise-multiplier": list[float], "history-sample-rate": list[float],
    "history-steps": list[int],
}
HISTORY = ("history-noise-multiplier", "history-sample-rate", "history-steps")


def check_train_reply(content: RecordDict, sent: dict[str, torch.Tensor], max_update_norm: float) -> str | None:
    """Why this train reply (its content) must be dropped, or None if it may be aggregated."""
    if set(content.keys()) != {"arrays", "metrics"}:
        return f"unexpected records {sorted(content.keys())}; expected arrays and metrics"
    metrics = content["metrics"]
    for key, kind in TRAIN_METRICS.items():
        if key not in metrics:
            return f"metric {key!r} missing"
        value = metrics[key]
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            return f"metric {key!r} must be an integer, got {type(value).__name__}"
        if kind is float and not isinstance(value, (int, float)):
            return f"metric {key!r} must be a number, got {type(value).__name__}"
        if kind in (list[int], list[float]):
            element = kind.__args__[0]
            if not isinstance(value, list) or not all(isinstance(v, element) and not isinstance(v, bool)
                                                      and math.isfinite(v) for v in value):
                return f"metric {key!r} must be a list of finite {element.__name__}s"
        if key not in ("epsilon", "epsilon-max") and isinstance(value, float) and not math.isfinite(value):
            return f"metric {key!r} is {value}"
    extra = sorted(set(metrics.keys()) - set(TRAIN_METRICS))
    if extra:
        return f"undeclared metric(s) {extra}"
    if len({len(metrics[k]) for k in HISTORY}) != 1:
        return "the accountant history lists differ in length"
    if metrics["num-examples"] < 1:
        return f"num-examples is {metrics['num-examples']}"
    try:
        received = content["arrays"].to_torch_state_dict()
    except Exception as e:  # a malformed array record cannot even be decoded
        return f"arrays cannot be read ({e})"
    if set(received) != set(sent):
        missing, extra = sorted(set(sent) - set(received)), sorted(set(received) - set(sent))
        return f"adapter tensors differ: {len(received)} received, {len(sent)} expected" + (
            f"; missing {missing[:3]}" if missing else "") + (f"; unexpected {extra[:3]}" if extra else "")
    for name, reference in sent.items():
        tensor = received[name]
        if tensor.shape != reference.shape:
            return f"{name}: shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
        if tensor.dtype != reference.dtype:
            return f"{name}: dtype {tensor.dtype}, expected {reference.dtype}"
        if not torch.isfinite(tensor).all():
            return f"{name}: {int((~torch.isfinite(tensor)).sum())} non-finite value(s)"
    norm = update_norm(received, sent)
    if norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds max-update-norm {max_update_norm:g}"
    return None


def update_norm(received: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> float:
    """‖θ_k − θ‖₂: the L2 norm of a client's change to the global adapter, over all its tensors."""
    return math.sqrt(sum(float(((received[k].double() - sent[k].double()) ** 2).sum()) for k in sent if k in received))
