"""Top-K ranking metrics with full ranking over the whole catalog (no sampled negatives).

For one user with ranked list ``r`` (best first) and relevant set ``R``:

* HR@K     = 1 if any of ``R`` is in ``r[:K]`` else 0
* Recall@K = |r[:K] ∩ R| / |R|
* NDCG@K   = Σ_{i<K, r_i∈R} 1/log2(i+2)  /  Σ_{i<min(K,|R|)} 1/log2(i+2)

With leave-last-out ``R`` is the single held-out item, so Recall@K == HR@K and
NDCG@K = 1/log2(rank+2). Reported values are means over users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from common.data import privacy_units

METRICS = ("hr@10", "ndcg@10", "recall@20")


def ranking_metrics(ranked: Sequence[int], relevant: set[int], k: int) -> dict[str, float]:
    """HR@k, NDCG@k and Recall@k of one ranked list against a set of relevant items."""
    if not relevant:
        raise ValueError("relevant set is empty")
    top = list(ranked[:k])
    hits = [i for i, item in enumerate(top) if item in relevant]
    dcg = sum(1.0 / math.log2(i + 2) for i in hits)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return {
        f"hr@{k}": float(bool(hits)),
        f"ndcg@{k}": dcg / idcg,
        f"recall@{k}": len(hits) / len(relevant),
    }


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: Sequence[Sequence[int]]) -> torch.Tensor:
    """0-based rank of each target among all catalog items, the user's seen items excluded.

    Ties count against the target (an item scored equal to it ranks ahead), so a constant
    scorer cannot look good.
    """
    scores = scores.clone().float()
    for row, items in enumerate(seen):
        items = [i for i in items if i != int(targets[row])]
        if items:
            scores[row, items] = float("-inf")
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores >= target_scores).sum(dim=1) - 1


def per_user_metrics(ranks: torch.Tensor) -> dict[str, torch.Tensor]:
    """HR@10, NDCG@10 and Recall@20 of each user with one held-out item (0-based ``ranks``)."""
    ranks = ranks.double()
    return {
        "hr@10": (ranks < 10).double(),
        "ndcg@10": torch.where(ranks < 10, 1.0 / torch.log2(ranks + 2), torch.zeros_like(ranks)),
        "recall@20": (ranks < 20).double(),
    }


def metrics_from_ranks(ranks: torch.Tensor) -> dict[str, float]:
    """Mean HR@10, NDCG@10 and Recall@20 over users with one held-out item each."""
    return {k: v.mean().item() for k, v in per_user_metrics(ranks).items()}


def item_counts(items: Sequence[int], num_items: int) -> torch.Tensor:
    """How often each catalog index occurs in ``items``."""
    counts = torch.zeros(num_items)
    counts.index_add_(0, torch.as_tensor(list(items), dtype=torch.long), torch.ones(len(items)))
    return counts


def unit_histogram(examples, num_items: int, unit: str) -> torch.Tensor:
    """The training-target histogram a site releases for the popularity prior, with L2
    sensitivity 1 in its privacy unit: one count per example, or per user its counts scaled to
    unit L2 norm (a user's histogram c_u becomes c_u / ‖c_u‖, so adding or removing the user
    moves the total by exactly 1)."""
    if unit == "example":
        return item_counts([ex.target for ex in examples], num_items)
    total = torch.zeros(num_items, dtype=torch.float64)
    for user in privacy_units(examples, "user"):
        counts = item_counts([examples[i].target for i in user], num_items).double()
        total += counts / counts.norm()
    return total.float()


def popularity_scores(train_items: Sequence[int], num_items: int) -> torch.Tensor:
    """Item scores of the popularity baseline: how often each item occurs in training interactions."""
    # Break ties by catalog order so the baseline is a strict, reproducible ranking.
    return item_counts(train_items, num_items) - torch.arange(num_items) * 1e-6
