"""The paired bootstrap of simulations/significance.py on per-user metrics with known answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.metrics import METRICS, per_user_metrics
from simulations.significance import mean_over_runs, paired_bootstrap


def test_per_user_metrics_from_ranks():
    m = per_user_metrics(torch.tensor([0, 9, 10, 19, 20]))
    assert m["hr@10"].tolist() == [1, 1, 0, 0, 0]
    assert m["recall@20"].tolist() == [1, 1, 1, 1, 0]
    assert m["ndcg@10"].tolist() == pytest.approx([1.0, 1 / torch.log2(torch.tensor(11.0)).item(), 0, 0, 0])


def test_paired_bootstrap_separates_a_real_lift_from_none():
    g = torch.Generator().manual_seed(1)
    baseline = {"hr@10": (torch.rand(2000, generator=g) < 0.1).double()}
    # The model hits for every user the baseline hits for, and for 5 % more users besides.
    better = {"hr@10": torch.maximum(baseline["hr@10"], (torch.rand(2000, generator=g) < 0.05).double())}
    r = paired_bootstrap(better, baseline, resamples=2000)["hr@10"]
    assert r["lift"] == pytest.approx(better["hr@10"].mean().item() / baseline["hr@10"].mean().item() - 1)
    assert 0 < r["lift-low"] < r["lift"] < r["lift-high"] and r["p-not-better"] == 0
    same = paired_bootstrap(baseline, baseline, resamples=500)["hr@10"]
    assert same["lift"] == same["lift-low"] == same["lift-high"] == 0 and same["p-not-better"] == 1
    # Unpaired noise of the same size straddles 0: the interval must not claim a lift.
    other = {"hr@10": (torch.rand(2000, generator=g) < 0.1).double()}
    r = paired_bootstrap(other, baseline, resamples=2000)["hr@10"]
    assert r["lift-low"] < 0 < r["lift-high"] and 0.05 < r["p-not-better"] < 0.95


def test_several_runs_are_averaged_user_by_user_whatever_their_order():
    """Seeds split the users differently, so each run lists them in its own order: the mean
    matches them by id, and runs of other users are refused."""
    first = ("validation", ["a", "b", "c"], {k: torch.tensor([1.0, 0.0, 0.0]) for k in METRICS},
             {k: torch.tensor([0.0, 0.0, 1.0]) for k in METRICS}, "round 0")
    second = ("validation", ["c", "a", "b"], {k: torch.tensor([0.0, 0.0, 1.0]) for k in METRICS},
              {k: torch.tensor([0.0, 1.0, 0.0]) for k in METRICS}, "round 0")
    model, baseline = mean_over_runs([first, second], [Path("s0"), Path("s1")])
    for k in METRICS:  # model: a 1, 0; b 0, 1; c 0, 0. baseline: a 0, 1; b 0, 0; c 1, 0
        assert model[k].tolist() == [0.5, 0.5, 0.0] and baseline[k].tolist() == [0.5, 0.0, 0.5]
    other = ("validation", ["a", "b", "d"], first[2], first[3], "round 0")
    with pytest.raises(ValueError, match="s1: not the same held-out users as s0"):
        mean_over_runs([first, other], [Path("s0"), Path("s1")])
