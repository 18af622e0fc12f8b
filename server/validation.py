"""Every client reply is checked before it can touch the global adapter, the prior or the metrics.

Each reply kind (train, prior, evaluate) must carry exactly the fields ``common/releases.py``
lists for it, with their types; every number finite (ε may be inf: "no guarantee"). A train
reply must carry the adapter the server sent — the same tensor names, count, shapes and dtypes —
with every value finite and an update (θ_k − θ) whose L2 norm is at most ``max-update-norm``.
A prior reply must carry one histogram of the catalog's size, finite and not absurd; an evaluate
reply, sums and exact means within their ranges. Anything else is dropped with the first reason
found; the reason goes to ``metrics.jsonl`` and the ledger. The adapter check needs each client's
update, so it cannot run under SecAgg+ (which hides them); there, the protocol's own clipping to
``±secagg-clipping-range`` bounds each contribution.
"""

from __future__ import annotations

import math

import torch
from flwr.app import RecordDict

from common.releases import EVAL_SPLITS, EVAL_SUMS, REPLIES, fields_of

HISTORY = ("history-noise-multiplier", "history-sample-rate", "history-steps")
# Largest |value| a noisy count or sum may have: far above any real site's counts, far below
# what would swamp every other site's contribution to the prior or the metrics.
MAX_COUNT = 1e7


def check_fields(kind: str, content: RecordDict) -> str | None:
    """Why ``content`` is not a well-formed ``kind`` reply (common/releases.REPLIES), or None."""
    listed = REPLIES[kind]
    records = {name.split(".")[0] for name in listed}
    if set(content.keys()) != records:
        return f"unexpected records {sorted(content.keys())}; expected {' and '.join(sorted(records))}"
    present = fields_of(content)
    extra = sorted(present - set(listed))
    if extra:
        return f"undeclared field(s) {extra}"
    for name, field in listed.items():
        if field.kind == "tensors":
            continue
        if name not in present:
            if field.status == "simulation" or field.per_split:  # check_evaluate_reply: per split asked
                continue
            return f"metric {name.split('.', 1)[1]!r} missing"
        record, key = name.split(".", 1)
        if reason := check_value(key, content[record][key], field.kind):
            return reason
    metrics = content["metrics"]
    if len({len(metrics[k]) for k in HISTORY}) != 1:
        return "the accountant history lists differ in length"
    return None


def check_value(key: str, value, kind) -> str | None:
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        return f"metric {key!r} must be an integer, got {type(value).__name__}"
    if kind is float and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return f"metric {key!r} must be a number, got {type(value).__name__}"
    if kind is str and not isinstance(value, str):
        return f"{key!r} must be text"
    if kind in ("list[int]", "list[float]"):
        element = int if kind == "list[int]" else float
        if not isinstance(value, list) or not all(isinstance(v, element) and not isinstance(v, bool)
                                                  and math.isfinite(v) for v in value):
            return f"metric {key!r} must be a list of finite {element.__name__}s"
    if key not in ("epsilon", "epsilon-max") and isinstance(value, float) and not math.isfinite(value):
        return f"metric {key!r} is {value}"
    return None


def check_prior_reply(content: RecordDict, num_items: int, noise_multiplier: float) -> str | None:
    """Why this popularity-histogram reply must be dropped, or None if it may be summed."""
    if reason := check_fields("prior", content):
        return reason
    try:
        received = content["arrays"].to_torch_state_dict()
    except Exception as e:
        return f"arrays cannot be read ({e})"
    if list(received) != ["counts"]:
        return f"expected one tensor 'counts', got {sorted(received)[:3]}"
    counts = received["counts"]
    if counts.shape != (num_items,):
        return f"counts: shape {tuple(counts.shape)}, expected ({num_items},)"
    if not counts.dtype.is_floating_point:
        return f"counts: dtype {counts.dtype}, expected a float type"
    if not torch.isfinite(counts).all():
        return f"counts: {int((~torch.isfinite(counts)).sum())} non-finite value(s)"
    # A true count is >= 0; Gaussian noise goes below -10σ with probability < 1e-23.
    lowest = -10 * noise_multiplier - 1
    if counts.min() < lowest or counts.max() > MAX_COUNT:
        return f"counts: values in [{counts.min():.4g}, {counts.max():.4g}], outside [{lowest:g}, {MAX_COUNT:g}]"
    return None


def check_evaluate_reply(content: RecordDict, noise_std: float, splits: list[str]) -> str | None:
    """Why this evaluate reply must be dropped, or None: the sums of exactly the splits asked for,
    noisy sums within range, exact means in [0, 1]."""
    if reason := check_fields("evaluate", content):
        return reason
    metrics = content["metrics"]
    asked = {EVAL_SPLITS[split] for split in splits}
    answered = {prefix for prefix in EVAL_SPLITS.values() if any(f"{prefix}{k}" in metrics for k in EVAL_SUMS)}
    if answered != asked:
        return f"splits answered {sorted(answered)}, asked {sorted(asked)} (key prefixes)"
    if missing := [f"{prefix}{k}" for prefix in sorted(asked) for k in EVAL_SUMS if f"{prefix}{k}" not in metrics]:
        return f"metric(s) {missing} missing"
    lowest = -10 * noise_std - 1
    for key, value in metrics.items():
        if key.startswith("exact-"):
            top = MAX_COUNT if key.endswith("count") else 1.0
            if not 0.0 <= value <= top:
                return f"metric {key!r} = {value:.4g}, outside [0, {top:g}]"
        elif (key.removeprefix("val-").startswith("sum-") or key.removeprefix("val-") == "count") and not (
                lowest <= value <= MAX_COUNT):
            return f"metric {key!r} = {value:.4g}, outside [{lowest:.4g}, {MAX_COUNT:g}]"
    return None


def check_train_reply(content: RecordDict, sent: dict[str, torch.Tensor], max_update_norm: float) -> str | None:
    """Why this train reply (its content) must be dropped, or None if it may be aggregated."""
    if reason := check_fields("train", content):
        return reason
    metrics = content["metrics"]
    if not 1 <= metrics["num-examples"] <= MAX_COUNT:
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
