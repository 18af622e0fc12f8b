"""Loaders on both MovieLens layouts, the client data format, its errors, the partitioner."""

from __future__ import annotations

import dataclasses

import pytest

from common.data import (DataError, GROUPLENS_GENRES, load_movielens, read_catalog,
                         read_interactions, recbole_ml100k_dir, write_catalog, write_interactions)
from simulations.partition import assign, materialize, select_users


def test_recbole_wheel_layout_is_full_movielens_100k(movielens):
    catalog, interactions = movielens
    assert len(catalog) == 1682
    assert len(interactions) == 100_000
    assert len({it.user_id for it in interactions}) == 943
    toy = catalog.items[catalog.index["1"]]
    assert (toy.title, toy.year, toy.genres) == ("Toy Story", 1995, ("Animation", "Children's", "Comedy"))


def write_grouplens(movielens, folder, n_ratings=500):
    """The official GroupLens layout (u.data tab-separated, u.item '|' latin-1) of real rows."""
    catalog, interactions = movielens
    folder.mkdir()
    with open(folder / "u.data", "w") as f:
        for it in interactions[:n_ratings]:
            f.write(f"{it.user_id}\t{it.item_id}\t{int(it.rating)}\t{it.timestamp}\n")
    with open(folder / "u.item", "w", encoding="latin-1") as f:
        for item in catalog.items:
            flags = "|".join("1" if g in item.genres else "0" for g in GROUPLENS_GENRES)
            title = f"{item.title} ({item.year})" if item.year else item.title
            date = f"01-Jan-{item.year}" if item.year else ""
            f.write(f"{item.item_id}|{title}|{date}||http://example/|{flags}\n")


def test_grouplens_layout_by_path(movielens, tmp_path):
    write_grouplens(movielens, tmp_path / "ml-100k")
    catalog, interactions = load_movielens(tmp_path / "ml-100k")
    ref_catalog, ref_interactions = movielens
    assert len(catalog) == 1682 and len(interactions) == 500
    assert [i.text() for i in catalog.items] == [i.text() for i in ref_catalog.items]
    assert interactions[:5] == ref_interactions[:5]


def test_not_a_movielens_folder(tmp_path):
    with pytest.raises(DataError, match="not a MovieLens-100K folder"):
        load_movielens(tmp_path)


def test_client_format_round_trip(movielens, tmp_path):
    catalog, interactions = movielens
    write_catalog(catalog, tmp_path / "catalog.csv")
    assert [i.text() for i in read_catalog(tmp_path / "catalog.csv").items] == [i.text() for i in catalog.items]
    mine = [it for it in interactions if it.user_id in ("1", "2")]
    write_interactions(mine, tmp_path / "client")
    users = read_interactions(tmp_path / "client", catalog)
    assert set(users) == {"1", "2"}
    assert sum(len(h) for h in users.values()) == len(mine)
    assert all(a.timestamp <= b.timestamp for h in users.values() for a, b in zip(h, h[1:]))


@pytest.mark.parametrize("content, message", [
    ("user_id,item_id,rating,timestamp\n1,1,4,100\n1,99999,4,101\n", r"interactions.csv:3: field 'item_id': '99999' is not in the catalog"),
    ("user_id,item_id,rating,timestamp\n1,1,four,100\n", r"interactions.csv:2: field 'rating': 'four' is not a number"),
    ("user_id,item_id,timestamp\n1,1,100\n", r"interactions.csv:1: missing column\(s\) rating"),
    ("user_id,item_id,rating,timestamp\n1,1,4,100\n2,5,3\n", r"interactions.csv:3: expected 4 fields"),
    ("user_id,item_id,rating,timestamp\n", r"interactions.csv: no interactions"),
    ("user_id,item_id,rating,timestamp\n1,1,4,yesterday\n", r"interactions.csv:2: field 'timestamp': 'yesterday' is "
                                                           r"neither integer seconds"),
    ("user_id,item_id,rating,timestamp\n,1,4,100\n", r"interactions.csv:2: field 'user_id': missing or empty"),
    ("user_id,item_id,rating,timestamp\n1,1,9,100\n", r"interactions.csv:2: field 'rating': 9 is outside 0-5"),
])
def test_malformed_client_file_names_file_and_line(movielens, tmp_path, content, message):
    catalog, _ = movielens
    (tmp_path / "interactions.csv").write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_interactions(tmp_path, catalog)
    assert str(tmp_path) in str(err.value)


def test_wrong_encoding_names_line(movielens, tmp_path):
    catalog, _ = movielens
    (tmp_path / "interactions.csv").write_bytes(b"user_id,item_id,rating,timestamp,text\n1,1,4,100,ok\n1,2,4,101,caf\xe9\n")
    with pytest.raises(DataError, match=r"interactions.csv:3: not valid UTF-8"):
        read_interactions(tmp_path, catalog)


def test_leave_last_out_never_trains_on_held_out_items(small_split):
    catalog, users, train, valid, test = small_split
    assert len(valid) == len(test) == len(users)
    for user, history in users.items():
        last, second = catalog.index[history[-1].item_id], catalog.index[history[-2].item_id]
        test_ex = next(ex for ex in test if ex.target == last and len(ex.seen) == len(history) - 1)
        assert second in test_ex.seen and last not in test_ex.seen
    # No training example has a held-out interaction as target or in its history.
    held_out_positions = sum(2 for _ in users)
    assert len(train) == sum(len(h) - 3 for h in users.values()) and held_out_positions == 2 * len(users)
    assert all(len(ex.seen) <= max(len(h) for h in users.values()) - 3 for ex in train)


def test_user_text_has_titles_years_genres_ratings_most_recent_last(small_split):
    catalog, users, _, _, test = small_split
    history = next(iter(users.values()))
    text = test[0].text
    newest = catalog.items[catalog.index[history[-2].item_id]]
    assert text.rstrip().endswith(f"Rated {history[-2].rating:g}/5")
    assert newest.title in text.split(";")[-1] and str(newest.year) in text.split(";")[-1]
    assert newest.genres[0] in text.split(";")[-1]


def test_partitions(movielens, settings, tmp_path):
    catalog, interactions = movielens
    users = select_users(interactions, 60, seed=0)
    iid = assign(users, catalog, "silo", 4, 0.0, seed=0)
    assert sorted(u for part in iid for u in part) == sorted(users)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    per_user = assign(users, catalog, "user", 60, 0.0, seed=0)
    assert [len(p) for p in per_user] == [1] * 60
    skewed = assign(users, catalog, "silo", 4, 0.1, seed=0)
    assert sorted(u for part in skewed for u in part) == sorted(users) and all(skewed)
    with pytest.raises(ValueError, match="one client per user"):
        assign(users, catalog, "user", 10, 0.0, seed=0)

    s = dataclasses.replace(settings, max_users=20, partition_dir=str(tmp_path / "part"))
    root = materialize(s, 3)
    assert (root / "catalog.csv").is_file() and (root / "reference.json").is_file()
    total = 0
    for k in range(3):
        total += len(read_interactions(root / f"client-{k}", read_catalog(root / "catalog.csv")))
    assert total == 20


def test_recbole_is_read_not_imported():
    import sys

    assert recbole_ml100k_dir().is_dir()
    assert "recbole" not in sys.modules
