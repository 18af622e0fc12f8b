"""`fedrec client prepare` and `fedrec client validate` on real MovieLens rows, good and bad."""

from __future__ import annotations

import csv
import json

import pytest

from client.prepare import prepare, validate
from common.data import read_catalog, read_interactions, write_catalog
from common.cli import main as fedrec


@pytest.fixture()
def site(tmp_path, movielens):
    """A real site export (three MovieLens users) as CSV and JSONL, and the public catalog."""
    catalog, interactions = movielens
    users = sorted({it.user_id for it in interactions})[:3]
    events = [it for it in interactions if it.user_id in users]
    write_catalog(catalog, tmp_path / "catalog.csv")
    with open(tmp_path / "export.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["customer", "movie", "stars", "when", "review"])
        for it in events:
            w.writerow([it.user_id, it.item_id, f"{it.rating:g}", it.timestamp, "fine, really" if it.rating >= 4 else ""])
    with open(tmp_path / "export.jsonl", "w", encoding="utf-8") as f:
        for it in events:  # implicit events, ISO dates
            when = __import__("datetime").datetime.fromtimestamp(it.timestamp, __import__("datetime").timezone.utc)
            f.write(json.dumps({"user_id": it.user_id, "item_id": it.item_id, "timestamp": when.isoformat()}) + "\n")
    return tmp_path, events


COLUMNS = ["--columns", "user_id=customer", "item_id=movie", "rating=stars", "timestamp=when", "text=review"]


def test_prepare_csv_and_jsonl_give_the_client_format(site, capsys):
    root, events = site
    assert fedrec(["client", "prepare", str(root / "export.csv"), "--catalog", str(root / "catalog.csv"),
                   "--out", str(root / "a"), *COLUMNS, "--epsilon-max", "4"]) == 0
    assert fedrec(["client", "prepare", str(root / "export.jsonl"), "--catalog", str(root / "catalog.csv"),
                   "--out", str(root / "b")]) == 0
    catalog = read_catalog(root / "a" / "catalog.csv")
    a, b = read_interactions(root / "a", catalog), read_interactions(root / "b", catalog)
    assert sum(map(len, a.values())) == sum(map(len, b.values())) == len(events)
    first = sorted(a)[0]
    # Same events, same order, same timestamps either way; ratings and reviews only from the CSV.
    assert [(i.item_id, i.timestamp) for i in a[first]] == [(i.item_id, i.timestamp) for i in b[first]]
    assert all(i.rating is None for i in b[first]) and any(i.text == "fine, really" for i in a[first])
    assert json.loads((root / "a" / "budget.json").read_text()) == {"epsilon-max": 4.0, "delta": 1e-5}
    capsys.readouterr()
    assert fedrec(["client", "validate", str(root / "a")]) == 0
    out = capsys.readouterr().out
    assert "│ events " in out and str(len(events)) in out and "ε ≤ 4 at δ = 1e-05" in out


def test_replace_keeps_a_backup_and_the_accountant(site):
    root, events = site
    prepare(root / "export.csv", root / "catalog.csv", root / "s", dict(c.split("=") for c in COLUMNS[1:]))
    (root / "s" / "state").mkdir()
    (root / "s" / "state" / "accountant.json").write_text("{}")
    before = (root / "s" / "interactions.csv").read_text()
    prepare(root / "export.jsonl", root / "catalog.csv", root / "s", replace=True)
    backups = list((root / "s").glob("interactions.csv.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == before
    assert (root / "s" / "state" / "accountant.json").read_text() == "{}"
    assert (root / "s" / "interactions.csv").read_text() != before


BAD = [  # (file name, content, expected message fragment)
    ("e.csv", "user_id,item_id,timestamp\n1,50,881250949\n2,99999,881250949\n",
     "e.csv:3: field 'item_id': '99999' is not in the catalog"),
    ("e.csv", "user_id,item_id,rating,timestamp\n1,50,7,881250949\n", "e.csv:2: field 'rating': 7 is outside 0-5"),
    ("e.csv", "user_id,item_id,rating,timestamp\n1,50,good,881250949\n", "e.csv:2: field 'rating': 'good' is not a number"),
    ("e.csv", "user_id,item_id,timestamp\n1,50,yesterday\n", "e.csv:2: field 'timestamp': 'yesterday' is neither"),
    ("e.csv", "user_id,item_id,timestamp\n,50,881250949\n", "e.csv:2: field 'user_id': missing or empty"),
    ("e.csv", "user,item_id,timestamp\n1,50,881250949\n", "e.csv:1: missing column(s) user_id"),
    ("e.csv", "user_id,item_id,timestamp\n1,50,881250949,extra\n", "e.csv:2: expected 3 fields"),
    ("e.jsonl", '{"user_id": "1", "item_id": "50", "timestamp": 881250949}\n{"user_id": "1", "item_id": \n',
     "e.jsonl:2: not valid JSON"),
    ("e.jsonl", '["1", "50", 881250949]\n', "e.jsonl:1: expected a JSON object, got list"),
    ("e.jsonl", '{"user_id": "1", "item_id": "50", "timestamp": 881250949, "text": 5}\n',
     "e.jsonl:1: field 'text': expected a string, got int"),
    ("e.jsonl", '{"user_id": "1", "item_id": "50", "timestamp": -5}\n', "e.jsonl:1: field 'timestamp': -5"),
    ("e.jsonl", '{"user_id": "1", "item_id": "50"}\n', "e.jsonl:1: field 'timestamp': missing or empty"),
    ("e.xlsx", "whatever", "e.xlsx: unknown export format '.xlsx'"),
    ("e.csv", b"user_id,item_id,timestamp\n1,50,881250949\n\xff\xfe,50,1\n", "e.csv:3: not valid UTF-8"),
    ("e.csv", "user_id,item_id,timestamp\n", "e.csv: no events"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[m.split(": ", 1)[1][:40] for _, _, m in BAD])
def test_bad_exports_name_file_line_and_field_and_lose_nothing(site, capsys, name, content, message):
    root, _ = site
    prepare(root / "export.jsonl", root / "catalog.csv", root / "site")  # already prepared data
    before = {p.name: p.read_bytes() for p in (root / "site").iterdir()}
    export = root / name
    export.write_bytes(content if isinstance(content, bytes) else content.encode())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        fedrec(["client", "prepare", str(export), "--catalog", str(root / "catalog.csv"), "--out", str(root / "site"),
                "--replace"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (root / "site").iterdir()} == before  # nothing replaced or lost


def test_prepare_refuses_to_overwrite_without_replace(site):
    root, _ = site
    prepare(root / "export.jsonl", root / "catalog.csv", root / "site")
    with pytest.raises(ValueError, match="already holds prepared data"):
        prepare(root / "export.jsonl", root / "catalog.csv", root / "site")


def test_validate_lists_every_problem_and_counts_unknown_items(site, capsys):
    root, _ = site
    prepare(root / "export.jsonl", root / "catalog.csv", root / "site")
    path = root / "site" / "interactions.csv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[1], "99999", 1)
    lines[4] = lines[4].replace(lines[4].split(",")[1], "88888", 1)
    lines[6] = ",".join(lines[6].split(",")[:2] + ["9", *lines[6].split(",")[3:]])
    path.write_text("\n".join(lines) + "\n")
    summary = validate(root / "site")
    assert summary.unknown_items == 2
    assert [p.split(": ")[1] for p in summary.problems] == ["field 'item_id'", "field 'item_id'", "field 'rating'"]
    assert summary.problems[0].startswith(f"{path}:3:")
    with pytest.raises(SystemExit):
        fedrec(["client", "validate", str(root / "site")])
    err = capsys.readouterr().err.splitlines()  # one problem per stderr line, then the verdict
    assert err[:3] == summary.problems and "3 problem(s)" in err[3] and len(err) == 4
