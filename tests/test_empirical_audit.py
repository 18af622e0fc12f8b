"""The one-run canary audit (audit/empirical.py): the bound, and the planting."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from common.config import Settings, defaults
from common.data import leave_last_out, read_catalog, read_interactions
from audit.empirical import (CANARY_FILE, audit_scores, epsilon_lower_bound, p_value)
from simulations.partition import materialize


def test_all_correct_guesses_give_the_clopper_pearson_bound():
    """δ = 0, v = r: P[Bin(r, q) ≥ r] = q^r = p, so ε_lb = logit(p^(1/r)) exactly."""
    for r in (20, 100, 400):
        x = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(math.log(x / (1 - x)), rel=1e-6)


def test_delta_and_errors_only_lower_the_bound():
    assert epsilon_lower_bound(1000, 100, 100, 1e-5) < epsilon_lower_bound(1000, 100, 100, 0.0)
    assert epsilon_lower_bound(1000, 100, 95, 1e-5) < epsilon_lower_bound(1000, 100, 100, 1e-5)
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # a coin's accuracy proves nothing
    ps = [p_value(1000, 100, 90, eps, 1e-5) for eps in (0.0, 1.0, 2.0, 3.0)]
    assert ps == sorted(ps)  # a larger ε makes the observation less surprising


def test_fully_memorised_canaries_give_a_high_bound_and_uninformative_scores_zero():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    memorised = audit_scores({"planted": included + 0.1 * rng.random(1000)}, included, 1e-5)
    assert memorised["epsilon-lb"] >= 3  # all 400 top guesses right
    assert memorised["best"] == {"score": "planted", "guesses": 400, "correct": 400}
    noise = audit_scores({"a": rng.random(1000), "b": rng.random(1000)}, included, 1e-5)
    assert noise["epsilon-lb"] < 0.1 and noise["bonferroni-over"] == 12
    # A second, useless score costs only the Bonferroni split.
    both = audit_scores({"planted": included + 0.1 * rng.random(1000), "noise": rng.random(1000)}, included, 1e-5)
    assert 3 <= both["epsilon-lb"] < memorised["epsilon-lb"]


def test_canaries_are_planted_as_one_training_example_each(tmp_path):
    s = Settings.from_run_config({**defaults(), "max-users": 12, "canaries": 40,
                                  "partition-dir": str(tmp_path / "parts")})
    root = materialize(s, 3)
    canaries = json.loads((root / CANARY_FILE).read_text())["canaries"]
    assert len(canaries) == 40 and 5 < sum(c["included"] for c in canaries) < 35
    assert len({c["phrase"] for c in canaries}) == 40 and len({c["target-item"] for c in canaries}) == 40
    catalog = read_catalog(root / "catalog.csv")
    for k in range(3):
        with open(root / f"client-{k}" / "interactions.csv", encoding="utf-8") as f:
            planted = {row["user_id"] for row in csv.DictReader(f) if row["user_id"].startswith("canary-")}
        assert planted == {c["user"] for c in canaries if c["client"] == k and c["included"]}
        users = read_interactions(root / f"client-{k}", catalog)
        for c in canaries:
            if c["user"] in planted:
                train, valid, test = leave_last_out({c["user"]: users[c["user"]]}, catalog, s.history_len)
                assert len(train) == 1 and not valid and not test
                assert c["phrase"] in train[0].text and train[0].target == catalog.index[c["target-item"]]


def test_user_level_canaries_are_users_of_several_examples(tmp_path):
    """canary-examples = 4: each included canary is one user with 4 training examples, each
    with its phrase and predicting its target; its user-level histogram adds exactly 1 to the
    target (sensitivity 1), and the example-level setting refuses such canaries."""
    from client.train import privacy_units
    from common.config import ConfigError
    from common.metrics import unit_histogram

    config = {**defaults(), "max-users": 12, "canaries": 12, "canary-examples": 4,
              "partition-dir": str(tmp_path / "parts")}
    with pytest.raises(ConfigError, match="canary-examples = 4 .* set privacy-unit = user"):
        Settings.from_run_config(config)
    s = Settings.from_run_config({**config, "privacy-unit": "user"})
    root = materialize(s, 2)
    canaries = json.loads((root / CANARY_FILE).read_text())["canaries"]
    catalog = read_catalog(root / "catalog.csv")
    included = [c for c in canaries if c["included"]]
    assert included and all(c["examples"] == 4 for c in canaries)
    for c in included:
        users = read_interactions(root / f"client-{c['client']}", catalog)
        train, valid, test = leave_last_out({c["user"]: users[c["user"]]}, catalog, s.history_len)
        target = catalog.index[c["target-item"]]
        assert len(train) == 4 and len(privacy_units(train, "user")) == 1
        assert all(c["phrase"] in ex.text and ex.target == target for ex in train)
        assert [ex.target for ex in valid + test] == [target, target]
        histogram = unit_histogram(train, len(catalog), "user")
        assert float(histogram[target]) == pytest.approx(1.0) and float(histogram.sum()) == pytest.approx(1.0)


def test_gradient_canaries_join_the_clipped_sum_and_observe_the_noisy_one(tmp_path):
    """Real Opacus, σ = 0, q = 1, every canary included and no data gradient: each step's sum is
    C·Σ_k u_k, so every observation is Σ_j ⟨u_k, u_j⟩ = 1 + the directions' cross terms, exactly."""
    import torch
    from opacus.optimizers import DPOptimizer

    from client.train import GradientCanaries

    layer = torch.nn.Linear(30, 20)
    m, clip = 8, 0.5
    canaries = GradientCanaries({"seed": "ab" * 16, "included": [True] * m}, tmp_path / "obs" / "round-001.npy")
    optimizer = DPOptimizer(torch.optim.SGD(layer.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=4)
    canaries.attach(optimizer, 1.0, clip)
    for _ in range(2):
        for p in layer.parameters():
            p.grad_sample = torch.zeros((0, *p.shape))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    canaries.save()
    observed = np.load(tmp_path / "obs" / "round-001.npy")
    dim = sum(p.numel() for p in layer.parameters())
    u = torch.randn(m, dim, generator=torch.Generator().manual_seed(int("ab" * 16, 16) % 2**63))
    u = u / u.norm(dim=1, keepdim=True)
    expected = (u @ u.sum(0)).numpy()
    assert observed.shape == (2, m)
    np.testing.assert_allclose(observed, np.stack([expected, expected]), rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(expected - 1) < 0.5)  # near-orthogonal directions: each sees mostly itself
