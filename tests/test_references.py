"""The reference models' copy of the split is fedrec's: RecBole's leave-one-out by time holds out
the same validation and test item of every user (the command re-checks it inside RecBole)."""

from __future__ import annotations

import csv

from simulations.references import DATASET, write_split


def test_recboles_atomic_file_holds_out_fedrecs_items(tmp_path):
    split = write_split(tmp_path)
    with (tmp_path / DATASET / f"{DATASET}.inter").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["user_id:token", "item_id:token", "timestamp:float"]
    by_user: dict[str, list[tuple[float, str]]] = {}
    for row in rows:
        by_user.setdefault(row["user_id:token"], []).append((float(row["timestamp:float"]), row["item_id:token"]))
    assert len(rows) == 100_000 and len(by_user) == len(split["test"]) == 943
    for user, events in by_user.items():
        times = [t for t, _ in events]
        assert len(set(times)) == len(times)  # no ties: any sort by time gives one order
        ordered = [item for _, item in sorted(events)]
        valid_target, valid_seen = split["valid"][user]
        test_target, test_seen = split["test"][user]
        assert (ordered[-2], ordered[-1]) == (split["items"][valid_target], split["items"][test_target])
        assert [split["items"][i] for i in test_seen] == ordered[:-1]
