"""A site's own tooling: turn a raw export into the client data format, and check a data folder.

    fedrec client prepare export.jsonl --catalog catalog.csv --out /srv/fedrec/site-1
    fedrec client validate /srv/fedrec/site-1

The export is CSV (with a header row) or JSON Lines (one object per line), one event per row:

    user_id    who (any string; it never leaves the site)
    item_id    what, an ``item_id`` of the public catalog
    timestamp  when: integer seconds since 1970, or an ISO 8601 date / date-time
    rating     optional: a number 0-5; empty or absent for an implicit event (a view, a purchase)
    text       optional: the user's own words about the item (a review)

``--columns user_id=customer item_id=sku`` maps other column names onto these. Every problem is
reported as ``file:line: field 'name': what is wrong``. The prepared folder (``interactions.csv``,
a copy of the catalog, optionally ``budget.json``) is written to a temporary folder and moved in
place only when complete, so a failed run leaves whatever was there before untouched; an existing
folder is only replaced with ``--replace``, which keeps the old file as a dated backup and never
touches the folder's ``state/`` (the privacy accountant) or ``budget.json``.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.data import (
    REQUIRED_EVENT_FIELDS,
    DataError,
    parse_event,
    read_catalog,
    write_catalog,
    write_interactions,
)
from common.privacy import Budget, write_budget

FIELDS = ("user_id", "item_id", "timestamp", "rating", "text")


def parse_columns(pairs: list[str]) -> dict[str, str]:
    """``--columns ours=theirs ...`` as {ours: theirs}."""
    mapping = {}
    for pair in pairs:
        ours, sep, theirs = pair.partition("=")
        if not sep or ours not in FIELDS or not theirs:
            raise DataError(f"--columns {pair!r}: expected FIELD=COLUMN with FIELD one of {', '.join(FIELDS)}")
        mapping[ours] = theirs
    return mapping


def read_export(path: Path, columns: dict[str, str]) -> Iterator[tuple[int, dict]]:
    """(line number, {field: raw value}) for each event of a CSV or JSONL export."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    name = {f: columns.get(f, f) for f in FIELDS}
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if suffix == ".csv":
                reader = csv.DictReader(f)
                header = reader.fieldnames or []
                missing = [name[c] for c in REQUIRED_EVENT_FIELDS if name[c] not in header]
                if missing:
                    raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}; header is {header}")
                for row in reader:
                    if None in row or any(v is None for v in row.values()):
                        raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)})")
                    yield reader.line_num, {f: row.get(name[f]) for f in FIELDS}
            elif suffix in (".jsonl", ".ndjson"):
                for line_num, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{line_num}: not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{path}:{line_num}: expected a JSON object, got {type(obj).__name__}")
                    yield line_num, {f: obj.get(name[f]) for f in FIELDS}
            else:
                raise DataError(f"{path}: unknown export format {suffix or '(no suffix)'!r}; use .csv or .jsonl")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{path}: {e}") from None


def prepare(export: Path, catalog_path: Path, out: Path, columns: dict[str, str] | None = None,
            drop_unknown: bool = False, replace: bool = False, budget: Budget | None = None) -> dict:
    """Write ``out`` in the client data format from ``export``; returns what was written."""
    catalog = read_catalog(catalog_path)
    existing = out / "interactions.csv"
    if existing.exists() and not replace:
        raise DataError(f"{out}: already holds prepared data (interactions.csv); use --replace to replace it "
                        "(the old file is kept as a backup) or choose another --out")
    events, unknown = [], 0
    for line, raw in read_export(export, columns or {}):
        try:
            events.append(parse_event(raw, f"{export}:{line}", catalog))
        except DataError as e:
            if drop_unknown and "is not in the catalog" in str(e):
                unknown += 1
                continue
            raise
    if not events:
        raise DataError(f"{export}: no events" + (f" ({unknown} dropped as unknown items)" if unknown else ""))
    tmp = out.with_name(f".{out.name}.preparing")
    shutil.rmtree(tmp, ignore_errors=True)
    write_interactions(events, tmp)
    write_catalog(catalog, tmp / "catalog.csv")
    out.mkdir(parents=True, exist_ok=True)
    if existing.exists():
        existing.rename(out / f"interactions.csv.bak-{time.strftime('%Y%m%d-%H%M%S')}")
    (tmp / "interactions.csv").replace(existing)
    (tmp / "catalog.csv").replace(out / "catalog.csv")
    shutil.rmtree(tmp, ignore_errors=True)
    if budget is not None and not (out / "budget.json").exists():
        write_budget(out, budget)
    return {"events": len(events), "users": len({e.user_id for e in events}), "dropped-unknown": unknown,
            "out": str(out)}


@dataclass
class Summary:
    """What ``fedrec client validate`` reports about a data folder."""

    users: int = 0
    events: int = 0
    rated: int = 0
    implicit: int = 0
    with_text: int = 0
    first: int | None = None
    last: int | None = None
    unknown_items: int = 0
    evaluable_users: int = 0  # ≥ 3 events: one test, one validation, the rest training
    problems: list[str] = field(default_factory=list)
    budget: str = ""


def validate(folder: Path, catalog_path: Path | None = None, max_problems: int = 20) -> Summary:
    """Check every row of ``folder/interactions.csv`` against the catalog; never stops at the first."""
    summary = Summary()
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    if catalog_path is None:
        catalog_path = folder / "catalog.csv"
        catalog_path = catalog_path if catalog_path.is_file() else folder.parent / "catalog.csv"
    catalog = read_catalog(catalog_path)
    per_user: Counter = Counter()
    path = folder / "interactions.csv"
    for line, raw in read_export(path, {}):
        try:
            event = parse_event(raw, f"{path}:{line}", catalog)
        except DataError as e:
            summary.unknown_items += "is not in the catalog" in str(e)
            if len(summary.problems) < max_problems:
                summary.problems.append(str(e))
            continue
        per_user[event.user_id] += 1
        summary.events += 1
        summary.rated += event.rating is not None
        summary.implicit += event.rating is None
        summary.with_text += bool(event.text)
        summary.first = min(summary.first or event.timestamp, event.timestamp)
        summary.last = max(summary.last or event.timestamp, event.timestamp)
    summary.users = len(per_user)
    summary.evaluable_users = sum(n >= 3 for n in per_user.values())
    if not summary.events and not summary.problems:
        summary.problems.append(f"{path}: no events")
    if (folder / "budget.json").is_file():
        from common.privacy import read_budget

        try:
            b = read_budget(folder, {})
            declared = (f", declared-examples {b.declared_examples}" if b.declared_examples is not None
                        else ", no declared-examples (DP-SGD needs one, here or in --node-config)")
            summary.budget = f"ε ≤ {b.epsilon_max:g} at δ = {b.delta:g}{declared} ({b.source})"
        except ValueError as e:
            summary.problems.append(str(e))
    else:
        summary.budget = "none in this folder (give epsilon-max/delta/declared-examples in --node-config)"
    return summary

