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
    csv_records,
    parse_event,
    read_catalog,
    utf8_lines,
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
    name = {f: columns.get(f, f) for f in FIELDS}
    suffix = path.suffix.lower()
    if suffix == ".csv":
        for line, row in csv_records(path, list(REQUIRED_EVENT_FIELDS), name):
            yield line, {f: row.get(name[f]) for f in FIELDS}
    elif suffix in (".jsonl", ".ndjson"):
        for line_num, line in enumerate(utf8_lines(path), start=1):
            if line.strip():
                obj = json_object(line, f"{path}:{line_num}")
                yield line_num, {f: obj.get(name[f]) for f in FIELDS}
    elif not path.is_file():
        raise DataError(f"{path}: file not found")
    else:
        raise DataError(f"{path}: unknown export format {suffix or '(no suffix)'!r}; use .csv or .jsonl")


def json_object(line: str, where: str) -> dict:
    """One JSONL line: an object whose keys each appear once."""
    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        if twice := [k for k in keys if keys.count(k) > 1]:
            raise DataError(f"{where}: key {twice[0]!r} appears {keys.count(twice[0])} times in the object")
        return dict(pairs)

    try:
        obj = json.loads(line, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def prepare(export: Path, catalog_path: Path, out: Path, columns: dict[str, str] | None = None,
            drop_unknown: bool = False, replace: bool = False, budget: Budget | None = None) -> dict:
    """Write ``out`` in the client data format from ``export``; returns what was written.
    On any failure ``out`` is as it was and nothing else is left behind."""
    catalog = read_catalog(catalog_path)
    existing = out / "interactions.csv"
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; --out names the site's data folder (new, or one to --replace)")
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
    write_folder(out, events, catalog, budget)
    return {"events": len(events), "users": len({e.user_id for e in events}), "dropped-unknown": unknown,
            "out": str(out)}


def write_folder(out: Path, events: list, catalog, budget: Budget | None) -> None:
    """Everything into a temporary folder beside ``out``, then moved in place: a new folder at once,
    an existing one file by file (its old interactions.csv kept as a dated backup, its state/ and
    budget.json untouched). The temporary folder never outlives the call: it holds private events."""
    tmp = out.with_name(f".{out.name}.preparing")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write_interactions(events, tmp)
        write_catalog(catalog, tmp / "catalog.csv")
        if budget is not None and not (out / "budget.json").exists():
            write_budget(tmp, budget)
        if not out.exists():
            tmp.rename(out)
            return
        if (out / "interactions.csv").exists():
            (out / "interactions.csv").rename(out / f"interactions.csv.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        for part in tmp.iterdir():
            part.replace(out / part.name)
    except OSError as e:
        raise DataError(f"--out {out}: cannot write the site's folder there ({e.strerror or e}); nothing was "
                        "changed") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
            declared = "".join(f", {key} {value}" if value is not None else f", no {key}"
                               for key, value in (("declared-examples", b.declared_examples),
                                                  ("declared-users", b.declared_users)))
            unit = f", {b.privacy_unit}-level only" if b.privacy_unit else ""
            if b.distributed_noise_max_sites:
                unit += f", shares its noise with up to {b.distributed_noise_max_sites} sites under SecAgg+"
            summary.budget = (f"ε ≤ {b.epsilon_max:g} at δ = {b.delta:g}{declared}{unit} ({b.source}; DP-SGD needs "
                              "the declared size of its privacy unit, here or in --node-config)")
        except ValueError as e:
            summary.problems.append(str(e))
    else:
        summary.budget = ("none in this folder (give epsilon-max/delta/declared-examples/declared-users in "
                          "--node-config)")
    return summary

