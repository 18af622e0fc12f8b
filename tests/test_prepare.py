"""`fedrec client prepare` and `fedrec client validate` on real MovieLens rows, good and bad."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from client.prepare import prepare, read_export, validate
from common.data import DataError, parse_event, read_catalog, read_interactions, write_catalog
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
                   "--out", str(root / "a"), *COLUMNS, "--epsilon-max", "4", "--distributed-noise-max-sites",
                   "5"]) == 0
    assert fedrec(["client", "prepare", str(root / "export.jsonl"), "--catalog", str(root / "catalog.csv"),
                   "--out", str(root / "b")]) == 0
    catalog = read_catalog(root / "a" / "catalog.csv")
    a, b = read_interactions(root / "a", catalog), read_interactions(root / "b", catalog)
    assert sum(map(len, a.values())) == sum(map(len, b.values())) == len(events)
    first = sorted(a)[0]
    # Same events, same order, same timestamps either way; ratings and reviews only from the CSV.
    assert [(i.item_id, i.timestamp) for i in a[first]] == [(i.item_id, i.timestamp) for i in b[first]]
    assert all(i.rating is None for i in b[first]) and any(i.text == "fine, really" for i in a[first])
    assert json.loads((root / "a" / "budget.json").read_text()) == {"epsilon-max": 4.0, "delta": 1e-5,
                                                                     "distributed-noise-max-sites": 5}
    capsys.readouterr()
    assert fedrec(["client", "validate", str(root / "a")]) == 0
    out = capsys.readouterr().out
    assert "│ events " in out and str(len(events)) in out and "ε ≤ 4 at δ = 1e-05" in out
    assert "shares its noise with up to 5 sites" in " ".join(out.replace("│", " ").split())


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
    # values of the wrong JSON type: an error, never a traceback
    ("e.jsonl", '{"user_id": "1", "item_id": "50", "timestamp": 881250949, "rating": [4]}\n',
     "e.jsonl:1: field 'rating': [4] is not a number"),
    ("e.jsonl", '{"user_id": ["1"], "item_id": "50", "timestamp": 881250949}\n',
     "e.jsonl:1: field 'user_id': expected a string or an integer, got list"),
    ("e.jsonl", '{"user_id": "1", "item_id": {"id": 50}, "timestamp": 881250949}\n',
     "e.jsonl:1: field 'item_id': expected a string or an integer, got dict"),
    ("e.jsonl", '{"user_id": "1", "item_id": "50", "timestamp": [881250949]}\n', "e.jsonl:1: field 'timestamp': [8812"),
    ("e.jsonl", '{"user_id": true, "item_id": "50", "timestamp": 881250949}\n',
     "e.jsonl:1: field 'user_id': expected a string or an integer, got bool"),
    # a value that is rich markup is printed as text
    ("e.csv", "user_id,item_id,timestamp\n1,[/red],881250949\n", "e.csv:2: field 'item_id': '[/red]' is not in"),
    # bad data that used to be accepted
    ("e.csv", b"user_id,item_id,timestamp\n1\x00,50,881250949\n", "e.csv:2: a NUL byte (\\0) at character 2"),
    ("e.csv", "user_id,item_id,timestamp\n1\x07,50,881250949\n", "e.csv:2: field 'user_id': control character U+0007"),
    ("e.csv", "user_id,item_id,timestamp,user_id\n1,50,881250949,2\n", "e.csv:1: column 'user_id' appears 2 times"),
    ("e.jsonl", '{"user_id": "1", "item_id": "50", "timestamp": 881250949, "user_id": "2"}\n',
     "e.jsonl:1: key 'user_id' appears 2 times"),
    ("e.csv", "user_id,item_id,timestamp\n1,50,881250949000\n", "e.csv:2: field 'timestamp': '881250949000' is neither"),
    ("e.jsonl", '{"user_id": "1", "item_id": "50", "timestamp": "2999-01-01"}\n', "e.jsonl:1: field 'timestamp'"),
    # where: the line of the record, in the file
    ("e.csv", "user_id,item_id,timestamp,text\n1,50,881250949,ok\n1,50,881250950," + "x" * 200_000 + "\n",
     "e.csv:3: field larger than field limit"),
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


def test_a_bad_byte_deep_in_a_large_export_is_reported_at_its_own_line(site, capsys):
    """The line is counted in the file, not inside a decoder's chunk (a 2 MB export, the byte at line 40,001)."""
    root, _ = site
    lines = ["user_id,item_id,timestamp\n"] + [f"{n % 7},50,{881250949 + n}\n" for n in range(60_000)]
    data = "".join(lines[:40_000]).encode() + b"9,\xe9t\xe9,881250949\n" + "".join(lines[40_000:]).encode()
    (root / "big.csv").write_bytes(data)
    with pytest.raises(SystemExit):
        fedrec(["client", "prepare", str(root / "big.csv"), "--catalog", str(root / "catalog.csv"), "--out",
                str(root / "site")])
    assert f"{root / 'big.csv'}:40001: not valid UTF-8" in capsys.readouterr().err
    assert not (root / "site").exists()


def test_exports_with_a_byte_order_mark_are_read_as_utf8(site):
    """Excel's "CSV UTF-8" starts with a byte-order mark; so do some JSONL writers. Same events either way."""
    root, events = site
    for name in ("export.csv", "export.jsonl"):
        (root / f"bom-{name}").write_bytes(b"\xef\xbb\xbf" + (root / name).read_bytes())
    columns = dict(c.split("=") for c in COLUMNS[1:])
    for name, cols in (("export.csv", columns), ("export.jsonl", {})):
        prepare(root / name, root / "catalog.csv", root / f"plain-{name}", cols)
        prepare(root / f"bom-{name}", root / "catalog.csv", root / f"bom-{name}-out", cols)
        assert ((root / f"plain-{name}" / "interactions.csv").read_bytes()
                == (root / f"bom-{name}-out" / "interactions.csv").read_bytes())
    catalog = read_catalog(root / "catalog.csv")
    (root / "bom-catalog.csv").write_bytes(b"\xef\xbb\xbf" + (root / "catalog.csv").read_bytes())
    assert read_catalog(root / "bom-catalog.csv").index == catalog.index


def test_a_duplicate_catalog_id_names_the_id_and_both_lines(site):
    root, _ = site
    lines = (root / "catalog.csv").read_text().splitlines()
    (root / "dup.csv").write_text("\n".join(lines[:5] + [lines[3]] + lines[5:]) + "\n")
    with pytest.raises(DataError, match=r"dup.csv:6: field 'item_id': '3' is already the item of line 4"):
        read_catalog(root / "dup.csv")


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_failed_prepare_leaves_nothing_behind_and_says_why_in_words(site, capsys, where):
    """--out that is a file, or lies under one: exit 2 with the reason, no temporary copy of the events."""
    root, _ = site
    (root / "taken").write_text("not a folder")
    out = root / "taken" if where == "a file" else root / "taken" / "site"
    with pytest.raises(SystemExit) as exit_:
        fedrec(["client", "prepare", str(root / "export.jsonl"), "--catalog", str(root / "catalog.csv"),
                "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Errno" not in err and "Traceback" not in err
    assert ("is a file; --out names the site's data folder" if where == "a file"
            else "cannot write the site's folder there (Not a directory); nothing was changed") in err
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    assert (root / "taken").read_text() == "not a folder"


# Property tests: whatever a site feeds prepare and validate, the answer is exit 0 with a folder
# whose every row re-reads as the event it came from, or exit 2 with one line and nothing written.

IDS = st.one_of(st.text(max_size=8), st.integers(-5, 10**6), st.booleans(), st.none(), st.floats(allow_nan=True),
                st.lists(st.integers(), max_size=2))
ANY_EVENT = st.fixed_dictionaries({
    "user_id": IDS,
    "item_id": st.one_of(st.sampled_from(["1", "50", "172", "181"]), IDS),
    "timestamp": st.one_of(st.integers(-10, 4 * 10**12), st.text(max_size=12), st.sampled_from(["2001-09-09",
                                                                                                "1998-04-01T12:00Z"])),
    "rating": st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-2, 7), st.text(max_size=4)),
    "text": st.one_of(st.none(), st.text(max_size=30), st.integers()),
})
WELL_FORMED = st.fixed_dictionaries({  # quotes, commas, non-ASCII and odd spaces included
    "user_id": st.one_of(st.integers(0, 10**9), st.text(st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1,
                                                        max_size=8).filter(str.strip)),
    "item_id": st.sampled_from(["1", "50", "172", "181"]),
    "timestamp": st.one_of(st.integers(0, 1_700_000_000), st.sampled_from(["2001-09-09", "1998-04-01T12:00Z"])),
    "rating": st.one_of(st.none(), st.integers(0, 5), st.floats(0, 5)),
    "text": st.one_of(st.none(), st.text(st.characters(blacklist_categories=["Cc", "Cs"]), max_size=30)),
})
EVENT = st.one_of(WELL_FORMED, ANY_EVENT)


def run_prepare(root, export, capsys):
    out = root / "out"
    shutil.rmtree(out, ignore_errors=True)
    capsys.readouterr()
    try:
        code = fedrec(["client", "prepare", str(export), "--catalog", str(root / "catalog.csv"), "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert not [p for p in root.iterdir() if p.name.endswith(".preparing")]  # never a partial folder
    if code == 0:
        catalog = read_catalog(root / "catalog.csv")
        expected = [parse_event(raw, "", catalog) for _, raw in read_export(export, {})]
        again = [it for history in read_interactions(out, catalog).values() for it in history]
        assert sorted(again, key=repr) == sorted(expected, key=repr)  # every written row re-reads identically
    else:
        assert code == 2 and not out.exists(), err
        assert len([line for line in err.splitlines() if line.startswith("fedrec:")]) == 1, err
    assert "Traceback" not in err
    event(f"prepare exit {code}")
    return code


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(EVENT, min_size=1, max_size=4))
def test_prepare_on_random_jsonl_rows_exits_cleanly(site, capsys, rows):
    root, _ = site
    (root / "r.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    run_prepare(root, root / "r.jsonl", capsys)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200), good=st.integers(0, 3))
def test_prepare_and_validate_on_random_csv_bytes_exit_cleanly(site, capsys, body, good):
    root, _ = site
    rows = "".join(f"{n},50,{881250949 + n},4\n" for n in range(good)).encode()
    (root / "r.csv").write_bytes(b"user_id,item_id,timestamp,rating\n" + rows + body)
    run_prepare(root, root / "r.csv", capsys)
    folder = root / "validate-me"
    folder.mkdir(exist_ok=True)
    (folder / "interactions.csv").write_bytes(b"user_id,item_id,rating,timestamp,text\n" + body)
    capsys.readouterr()
    try:
        code = fedrec(["client", "validate", str(folder), "--catalog", str(root / "catalog.csv")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
