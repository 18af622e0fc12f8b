"""The one list of everything a site sends: every field of every reply kind, with its privacy status.

A field is either

* a **DP release**, charged to the site's own accountant before the reply is sent: its
  mechanism, L2 sensitivity and unit are stated here; or
* **public**: a function of public parameters only (the run config, the site's own declared
  budget and size, its accountant history of public (σ, q, steps)), so it is independent of
  the private data; or
* **simulation only**: exact figures a *simulated* site sends (a node the simulator plays:
  ``partition-id`` in its node config, no ``data-dir``). The simulator wrote that data itself,
  so it is not private; a deployed site (``data-dir``) never sends them.

The client checks every reply against this list before it leaves (``check_reply``, fail
closed) and the server validates every reply against it (``server/validation.py``). A field
that is not here is a bug, and a test fails on it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Sensitivities are stated in the run's privacy unit (privacy-unit, common/privacy.py UNITS): one
# training example, or all the data of one user of the site.


@dataclass(frozen=True)
class Field:
    kind: type | str  # int, float, "list[int]", "list[float]", str, "tensors"
    status: str  # "dp", "public" or "simulation"
    why: str  # the mechanism and sensitivity (dp), or why it is independent of the data
    per_split: bool = False  # an evaluation sum: present exactly when its split was asked for


ACCOUNTING = {
    "epsilon": Field(float, "public", "ε of the site's accountant history, a function of public (σ, q, steps)"),
    "delta": Field(float, "public", "the site's own δ (its budget)"),
    "epsilon-max": Field(float, "public", "the site's own budget"),
    "declined": Field(int, "public", "0/1: whether the public price of the request fits the public budget"),
    "client-id": Field(int, "public", "a random number the site drew once (pseudonymised by the server)"),
    "history-noise-multiplier": Field("list[float]", "public", "σ of each past release (run config)"),
    "history-sample-rate": Field("list[float]", "public",
                                 "q of each past release: batch-size / declared-examples or declared-users, or 1"),
    "history-steps": Field("list[int]", "public", "steps of each past release (run config)"),
}

EVAL_SUMS = ("sum-hr@10", "sum-ndcg@10", "sum-recall@20", "count")
# The splits an evaluate request may ask for, and their key prefixes. Validation is read every
# round; the test split only when the run config says evaluate-test and only at the last round
# (server/rounds.py), so that no choice can be made on it.
EVAL_SPLITS = {"val": "val-", "test": ""}
EXACT = ("hr@10", "ndcg@10", "recall@20", "count")


def eval_sensitivity(splits: int) -> float:
    """L2 sensitivity of the evaluation sums of ``splits`` splits: each evaluated user adds at
    most 1 to each of the 4 sums per split (HR, NDCG, Recall ∈ [0, 1], count 1), so removing
    any part of one user's data moves the vector by at most √(4·splits)."""
    return (4 * splits) ** 0.5


REPLIES: dict[str, dict[str, Field]] = {
    "train": {
        "arrays": Field("tensors", "dp", "the adapter after local DP-SGD: Poisson rate q (public) over privacy "
                                         "units, each unit's gradient (an example's, or the mean over at most "
                                         "examples-per-user of a user's examples) clipped to max-grad-norm, "
                                         "N(0, σ²C²) on the sum; (σ, q, local-steps). Under distributed-noise: "
                                         "θ − one step's noisy gradient sum / batch-size, this site's noise "
                                         "N(0, σ²C²/T) with T SecAgg+'s threshold on the clipped sum boxed to ±r/4 · "
                                         "batch-size per coordinate, sent only inside SecAgg+, whose "
                                         "sum of ≥ T sites carries σ; (σ, q, 1), under SecAgg+'s trust model"),
        "metrics.num-examples": Field(float, "dp", "Gaussian count of the privacy units trained on (examples or "
                                                   "users): n + N(0, count-noise-multiplier²), sensitivity 1; "
                                                   "FedAvg's weight; (σ_n, 1, 1). Under distributed-noise: 1, "
                                                   "public (every site weighs the same; nothing released)"),
        "metrics.steps": Field(int, "public", "local-steps (run config)"),
        "metrics.sample-rate": Field(float, "public", "q = batch-size / declared-examples or declared-users"),
        "metrics.noise-multiplier": Field(float, "public", "σ (run config)"),
        "metrics.max-grad-norm": Field(float, "public", "C (run config)"),
        "metrics.count-noise-multiplier": Field(float, "public", "σ_n (run config); 0 under distributed-noise"),
        **{f"metrics.{k}": f for k, f in ACCOUNTING.items()},
    },
    "evaluate": {
        **{f"metrics.{prefix}{k}": Field(float, "dp", "Gaussian sums over the site's users, on each split asked "
                                                       "for (validation; test only at a final round): "
                                                       "+ N(0, (σ_e·√(4·splits))²) each, L2 sensitivity "
                                                       "√(4·splits) for all the sums together; (σ_e, 1, 1)", per_split=True)
           for prefix in EVAL_SPLITS.values() for k in EVAL_SUMS},
        **{f"metrics.exact-{prefix}{k}": Field(float, "simulation", "exact mean (count: exact number of users) "
                                                                     "of a simulated site")
           for prefix in EVAL_SPLITS.values() for k in EXACT},
        "metrics.noise-multiplier": Field(float, "public", "σ_e (run config eval-noise-multiplier)"),
        **{f"metrics.{k}": f for k, f in ACCOUNTING.items()},
    },
    "prior": {
        "arrays": Field("tensors", "dp", "Gaussian histogram of training targets: + N(0, σ_h²) per item, "
                                         "sensitivity 1 (one count per example, or a user's counts scaled to "
                                         "unit L2 norm); (σ_h, 1, 1). Under central-dp (dp = false): the "
                                         "histogram scaled to L2 norm ≤ 1, noised once by the server. Under "
                                         "distributed-noise: counts boxed to [0, r/2 / 1e-3], + N(0, σ_h²/T), in "
                                         "thousands, only inside SecAgg+, whose sum of ≥ T sites carries σ_h; "
                                         "(σ_h, 1, 1), under SecAgg+'s trust model"),
        "metrics.num-examples": Field(float, "public", "1, always: a histogram's weight (in SecAgg+'s sum under "
                                                       "distributed-noise, every site weighs the same)"),
        "metrics.noise-multiplier": Field(float, "public", "σ_h (run config prior-noise-multiplier)"),
        "metrics.sample-rate": Field(float, "public", "1"),
        "metrics.steps": Field(int, "public", "1"),
        **{f"metrics.{k}": f for k, f in ACCOUNTING.items()},
    },
    "price": {},  # asked before a SecAgg+ round (server/secure_aggregation.py): empty = take part; else a decline
    "decline": {
        "decline.reason": Field(str, "public", "the public price (ε before/after at the site's δ) and budget"),
        **{f"metrics.{k}": f for k, f in ACCOUNTING.items()},
    },
    "error": {
        "error.reason": Field(str, "public", "one of ERROR_CATEGORIES; the detail stays in the site's own log"),
    },
}

# What a failing site tells the server: a category, never the exception text (which may quote
# private values). The site's own log (state-dir/errors.log) keeps the detail.
ERROR_CATEGORIES = {
    "data": "the site's data could not be read",
    "budget": "the site's privacy budget or declared size is missing or malformed",
    "mismatch": "the base model or catalog differs from the server's",
    "request": "the request could not be applied (e.g. an adapter of the wrong form)",
    "internal": "the site failed while computing its reply",
}


class UndeclaredRelease(RuntimeError):
    """A reply about to leave the site carries a field the release list does not name."""


def fields_of(content) -> set[str]:
    """The release-list names of a reply's content: ``arrays`` for a tensor record, ``record.key`` else."""
    names = set()
    for record_name in content.array_records:
        names.add(record_name)
    for record_name, record in list(content.metric_records.items()) + list(content.config_records.items()):
        names.update(f"{record_name}.{key}" for key in record)
    return names


def check_reply(kind: str, content) -> None:
    """Fail closed: refuse to send a reply with a field not listed for ``kind``."""
    undeclared = sorted(fields_of(content) - set(REPLIES[kind]))
    if undeclared:
        raise UndeclaredRelease(f"{kind} reply: field(s) {undeclared} are not in common/releases.py")
