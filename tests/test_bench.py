"""The benchmark's own measures, on steps whose memory is known."""

from __future__ import annotations

import pytest
import torch

from simulations.bench import tensor_peak_mb


def test_a_steps_tensor_peak_counts_what_it_holds_at_once_and_not_what_existed_before():
    before = torch.ones(2**22)  # 16 MB, used by the step but allocated before it

    def step(existing):
        a = existing[: 2**20] * 2  # 4 MB
        b = a + 1  # 4 MB: 8 MB held at once
        del a
        c = b[: 2**19] * 3  # 2 MB: 6 MB held
        return float(c.sum())

    # a and b at once; the 16 MB before the step and the 2 MB after its peak do not count (a
    # scalar's few bytes do)
    assert abs(tensor_peak_mb(step, before) - 8.0) < 2**-10


def test_the_total_time_ratios_bootstrap_interval_spans_what_resampled_batches_give():
    from simulations.bench import bootstrap_total_ratio

    # every batch 1.05× its baseline: every resample's total is too
    assert bootstrap_total_ratio([1.05, 2.1, 3.15], [1.0, 2.0, 3.0]) == pytest.approx((1.05, 1.05), rel=1e-12)
    # two batches: resamples give 4/2, 3/2 or 2/2, so the interval is their extremes
    assert bootstrap_total_ratio([2.0, 1.0], [1.0, 1.0]) == (1.0, 2.0)
