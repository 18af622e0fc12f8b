"""The centralized reference (simulations/centralized.py), with and without DP."""

from __future__ import annotations

import pytest

from common.privacy import epsilon
from simulations.centralized import main


@pytest.mark.parametrize("dp", [False, True])
def test_centralized_reference_runs_and_accounts(dp, tmp_path):
    """Without --test only the validation split is scored; --test (the DP case here) adds the test split."""
    argv = ["--steps", "2", "--eval-every", "2", "--max-users", "12", "--out", str(tmp_path / "c.json"),
            "--set", "model-layers=2", "batch-size=8", "noise-multiplier=0.8"] + (["--dp", "--test"] if dp else [])
    figures = main(argv)
    assert ("test" in figures) == dp and set(figures["popularity"]) == ({"valid", "test"} if dp else {"valid"})
    assert figures["valid"] == {k.removeprefix("val-"): v for k, v in figures["curve"][-1].items() if k.startswith("val-")}
    for split in figures["popularity"]:
        assert 0 <= figures[split]["ndcg@10"] <= figures[split]["hr@10"] <= 1
    assert figures["users"] == 12 and (tmp_path / "c.json").is_file()
    if dp:
        history = [(10.0, 1.0, 1), (0.8, 8 / figures["train-examples"], 2)]
        assert figures["epsilon"] == pytest.approx(epsilon(history, 1e-5, "prv"), rel=1e-12)
    else:
        assert figures["epsilon"] is None
