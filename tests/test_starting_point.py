"""The untrained model's grid (simulations/starting_point.py) reads the validation split only."""

from __future__ import annotations

import simulations.starting_point as starting_point


class Unreadable(list):
    def __iter__(self):
        raise AssertionError("the test split was read")

    def __len__(self):
        raise AssertionError("the test split was read")


def test_the_grid_scores_validation_and_never_touches_the_test_split(monkeypatch, tmp_path):
    real = starting_point.leave_last_out

    def guarded(*args, **kwargs):
        train, valid, test = real(*args, **kwargs)
        return train, valid, Unreadable(test)

    monkeypatch.setattr(starting_point, "leave_last_out", guarded)
    rows = starting_point.main(["--layers", "2", "--history", "1", "3", "--scale", "8", "--max-users", "12",
                                "--out", str(tmp_path / "grid.json")])
    assert [(r["model-layers"], r["history-len"], r["initial-score-scale"]) for r in rows] == [(2, 1, 8.0), (2, 3, 8.0)]
    for r in rows:
        assert 0 <= r["valid"]["ndcg@10"] <= r["valid"]["hr@10"] <= r["valid"]["recall@20"] <= 1
    # A longer user text is a different user embedding: the two configurations differ somewhere.
    assert rows[0]["valid"] != rows[1]["valid"]
