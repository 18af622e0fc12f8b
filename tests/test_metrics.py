import math

import pytest
import torch

from common.metrics import metrics_from_ranks, popularity_scores, ranking_metrics, target_ranks


def test_ranking_metrics_on_hand_built_lists():
    ranked = [7, 3, 9, 1, 4, 0, 2, 5, 6, 8]
    # one relevant item at position 2 (0-based)
    m = ranking_metrics(ranked, {9}, k=3)
    assert m["hr@3"] == 1.0
    assert m["recall@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(4))
    # relevant item just outside the cut-off
    assert ranking_metrics(ranked, {1}, k=3) == {"hr@3": 0.0, "ndcg@3": 0.0, "recall@3": 0.0}
    # two relevant items at positions 0 and 4, K=5: DCG = 1 + 1/log2(6), IDCG = 1 + 1/log2(3)
    m = ranking_metrics(ranked, {7, 4}, k=5)
    assert m["recall@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / (1 + 1 / math.log2(3)))
    # three relevant, only one in top-2
    m = ranking_metrics(ranked, {3, 5, 6}, k=2)
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_target_ranks_exclude_seen_and_count_ties_against_target():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.5]])
    # user 0: target item 2; item 0 is in their history, so only item 1 ranks ahead
    # user 1: all tied -> the target ranks last among 4
    ranks = target_ranks(scores, torch.tensor([2, 0]), [[0], []])
    assert ranks.tolist() == [1, 3]


def test_metrics_from_ranks_matches_definition():
    ranks = torch.tensor([0, 9, 10, 19, 20])
    m = metrics_from_ranks(ranks)
    assert m["hr@10"] == pytest.approx(2 / 5)
    assert m["recall@20"] == pytest.approx(4 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(11)) / 5)


def test_popularity_scores_rank_by_count():
    scores = popularity_scores([2, 2, 2, 0, 0, 3], num_items=4)
    assert torch.argsort(scores, descending=True).tolist() == [2, 0, 3, 1]
