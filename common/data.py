"""Data schema shared by clients, the simulation partitioner and evaluation.

Two on-disk files, both UTF-8 CSV with a header row:

* the public item catalog, ``catalog.csv``::

      item_id,title,year,genres
      1,Toy Story,1995,Animation|Children's|Comedy

* one client's private data, a folder holding ``interactions.csv``::

      user_id,item_id,rating,timestamp,text
      196,242,3,881250949,

  ``rating`` is 0-5 (or empty for an implicit event), ``timestamp`` integer seconds
  (or an ISO 8601 date), ``text`` optional free text the user wrote about the item.

Every problem in a file is reported as ``DataError("path:line: what is wrong")``.

MovieLens-100K is read from the ``recbole==1.2.1`` wheel (``dataset_example/ml-100k``,
atomic files) or from an official GroupLens ``ml-100k`` folder (``u.data``, ``u.item``).
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CATALOG_COLUMNS = ["item_id", "title", "year", "genres"]
INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp", "text"]
REQUIRED_INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
REQUIRED_EVENT_FIELDS = ("user_id", "item_id", "timestamp")  # rating may be empty: an implicit event

GROUPLENS_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
]


class DataError(ValueError):
    """A data file is malformed; the message starts with ``path:line:``."""


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    year: int | None
    genres: tuple[str, ...]

    def text(self) -> str:
        year = f" ({self.year})" if self.year else ""
        genres = f". {', '.join(self.genres)}" if self.genres else ""
        return f"{self.title}{year}{genres}"


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    rating: float | None
    timestamp: int
    text: str = ""


class Catalog:
    """The public item catalog: items in a fixed order, so item index == score column."""

    def __init__(self, items: list[Item]):
        self.items = items
        self.index = {item.item_id: i for i, item in enumerate(items)}
        if len(self.index) != len(items):
            raise DataError("catalog: duplicate item ids")

    def __len__(self) -> int:
        return len(self.items)

    def texts(self) -> list[str]:
        return [item.text() for item in self.items]


# --- MovieLens-100K ---------------------------------------------------------------------


def recbole_ml100k_dir() -> Path:
    """Folder of MovieLens-100K inside the installed ``recbole`` wheel (never imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "recbole is not installed: `pip install --no-deps recbole==1.2.1` ships "
            "MovieLens-100K, or pass the path of a GroupLens ml-100k folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        raise DataError(f"{path}: no ml-100k.inter in the recbole wheel")
    return path


def load_movielens(path: str | Path | None = None) -> tuple[Catalog, list[Interaction]]:
    """MovieLens-100K from the recbole wheel (``path`` None or "") or a folder by path.

    The folder may be recbole's atomic-file layout (``ml-100k.inter``/``ml-100k.item``)
    or GroupLens' official one (``u.data``/``u.item``).
    """
    folder = Path(path) if path else recbole_ml100k_dir()
    if (folder / "ml-100k.inter").is_file():
        catalog = Catalog(_read_recbole_items(folder / "ml-100k.item"))
        interactions = _read_tsv_ratings(folder / "ml-100k.inter", header=True)
    elif (folder / "u.data").is_file():
        catalog = Catalog(_read_grouplens_items(folder / "u.item"))
        interactions = _read_tsv_ratings(folder / "u.data", header=False)
    else:
        raise DataError(
            f"{folder}: not a MovieLens-100K folder (expected ml-100k.inter + ml-100k.item "
            "from recbole, or u.data + u.item from GroupLens)"
        )
    for line, inter in enumerate(interactions, start=2 if (folder / "ml-100k.inter").is_file() else 1):
        if inter.item_id not in catalog.index:
            raise DataError(f"{folder}: ratings line {line}: unknown item id {inter.item_id!r}")
    return catalog, interactions


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid {encoding} ({e.reason})") from None


def _read_recbole_items(path: Path) -> list[Item]:
    lines = _read_lines(path)
    items = []
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 4:
            raise DataError(f"{path}:{n}: expected 4 tab-separated fields, got {len(fields)}")
        item_id, title, year, genres = fields
        items.append(Item(item_id, title.strip(), _parse_year(year), tuple(genres.split())))
    return items


def _read_grouplens_items(path: Path) -> list[Item]:
    items = []
    for n, line in enumerate(_read_lines(path, encoding="latin-1"), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 5 + len(GROUPLENS_GENRES):
            raise DataError(f"{path}:{n}: expected 24 '|'-separated fields, got {len(fields)}")
        title, year = _split_title_year(fields[1])
        if year is None and fields[2]:
            year = _parse_year(fields[2][-4:])
        flags = fields[5:]
        genres = tuple(g for g, flag in zip(GROUPLENS_GENRES, flags) if flag == "1")
        items.append(Item(fields[0], title, year, genres))
    return items


def _read_tsv_ratings(path: Path, header: bool) -> list[Interaction]:
    lines = _read_lines(path)
    start = 1 if header else 0
    out = []
    for n, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise DataError(f"{path}:{n}: expected 4 tab-separated fields, got {len(fields)}")
        try:
            out.append(Interaction(fields[0], fields[1], float(fields[2]), int(float(fields[3]))))
        except ValueError:
            raise DataError(f"{path}:{n}: rating and timestamp must be numbers") from None
    return out


def _split_title_year(raw: str) -> tuple[str, int | None]:
    match = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", raw)
    if match:
        return match.group(1), int(match.group(2))
    return raw.strip(), None


def _parse_year(raw: str) -> int | None:
    raw = raw.strip()
    return int(raw) if raw.isdigit() else None


# --- the fedrec on-disk format ------------------------------------------------------------


def write_catalog(catalog: Catalog, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CATALOG_COLUMNS)
        for item in catalog.items:
            writer.writerow([item.item_id, item.title, item.year or "", "|".join(item.genres)])


def read_catalog(path: str | Path) -> Catalog:
    path = Path(path)
    items, first_line = [], {}
    for line, row in csv_records(path, CATALOG_COLUMNS):
        if not row["item_id"] or not row["title"]:
            raise DataError(f"{path}:{line}: item_id and title must not be empty")
        if row["item_id"] in first_line:
            raise DataError(f"{path}:{line}: field 'item_id': {row['item_id']!r} is already the item of line "
                            f"{first_line[row['item_id']]}")
        first_line[row["item_id"]] = line
        year = row["year"].strip()
        if year and not year.isdigit():
            raise DataError(f"{path}:{line}: year {year!r} is not a number")
        genres = tuple(g for g in row["genres"].split("|") if g)
        items.append(Item(row["item_id"], row["title"], int(year) if year else None, genres))
    if not items:
        raise DataError(f"{path}: catalog is empty")
    return Catalog(items)


def write_interactions(interactions: list[Interaction], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "interactions.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(INTERACTION_COLUMNS)
        for it in interactions:
            rating = "" if it.rating is None else exact(it.rating)
            writer.writerow([it.user_id, it.item_id, rating, it.timestamp, it.text])


# Timestamps after this many seconds past now are refused: a clock a day fast is plausible; an
# export in milliseconds (~1.7e12, the year 55,000) or a far-future date is not.
FUTURE_SLACK = 86_400


def exact(x: float) -> str:
    """``x`` as text that reads back as exactly ``x``: 4 as "4", 0.3828125 in full."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(x)


def parse_timestamp(raw) -> int:
    """Integer seconds since 1970, or an ISO 8601 date / date-time (UTC unless it carries an offset),
    not before 1970 and not in the future."""
    if isinstance(raw, bool):
        raise ValueError
    if isinstance(raw, int):
        value = raw
    elif isinstance(raw, float) and raw.is_integer():
        value = int(raw)
    elif isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        value = int(raw.strip())
    elif isinstance(raw, str):
        when = datetime.datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        value = int(when.timestamp())
    else:
        raise ValueError
    if not 0 <= value <= time.time() + FUTURE_SLACK:
        raise ValueError
    return value


def parse_event(raw: dict, where: str, catalog: Catalog) -> Interaction:
    """One event, checked field by field; a DataError names ``where`` and the field."""
    for f in REQUIRED_EVENT_FIELDS:
        value = raw.get(f)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: field '{f}': missing or empty")
    user, item = identifier(raw, "user_id", where), identifier(raw, "item_id", where)
    if item not in catalog.index:
        raise DataError(f"{where}: field 'item_id': {item!r} is not in the catalog")
    try:
        timestamp = parse_timestamp(raw["timestamp"])
    except (ValueError, OverflowError, OSError):
        raise DataError(f"{where}: field 'timestamp': {raw['timestamp']!r} is neither integer seconds since 1970 "
                        "nor an ISO 8601 date, up to today (milliseconds? divide by 1000)") from None
    rating = raw.get("rating")
    if isinstance(rating, str):
        rating = rating.strip() or None
    if rating is not None:
        try:
            if isinstance(rating, bool):
                raise ValueError
            rating = float(rating)
        except (ValueError, TypeError):
            raise DataError(f"{where}: field 'rating': {raw['rating']!r} is not a number "
                            "(leave it empty for an implicit event)") from None
        if not (math.isfinite(rating) and 0 <= rating <= 5):
            raise DataError(f"{where}: field 'rating': {rating:g} is outside 0-5")
    text = raw.get("text")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field 'text': expected a string, got {type(text).__name__}")
    if text and (bad := control_character(text)):
        raise DataError(f"{where}: field 'text': control character {bad} (only tab and line breaks are text)")
    return Interaction(user, item, rating, timestamp, " ".join((text or "").split()))


def identifier(raw: dict, name: str, where: str) -> str:
    """A user or item id: a string or an integer, printable, without surrounding spaces."""
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: field '{name}': expected a string or an integer, got {type(value).__name__}")
    value = str(value).strip()
    if bad := control_character(value, allowed=""):
        raise DataError(f"{where}: field '{name}': control character {bad} in an id")
    return value


def control_character(s: str, allowed: str = "\t\r\n") -> str | None:
    """The first control character of ``s`` not in ``allowed``, as U+XXXX (None if there is none)."""
    for c in s:
        if (ord(c) < 32 or 0x7F <= ord(c) < 0xA0) and c not in allowed:
            return f"U+{ord(c):04X}"
    return None


def read_interactions(folder: str | Path, catalog: Catalog) -> dict[str, list[Interaction]]:
    """One client's private data: {user_id: interactions sorted oldest first}."""
    path = Path(folder) / "interactions.csv"
    users: dict[str, list[Interaction]] = {}
    for line, row in csv_records(path, REQUIRED_INTERACTION_COLUMNS):
        event = parse_event(row, f"{path}:{line}", catalog)
        users.setdefault(event.user_id, []).append(event)
    if not users:
        raise DataError(f"{path}: no interactions")
    for history in users.values():
        history.sort(key=lambda it: it.timestamp)  # stable: ties keep file order
    return users


def utf8_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file, each with its line ending. A byte-order mark (Excel's
    "CSV UTF-8") is dropped; a byte that is not UTF-8, or a NUL byte, is a DataError naming its
    line, counted in the file, however large."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line); "
                                "save the file as UTF-8") from None
            if "\x00" in line:
                raise DataError(f"{path}:{number}: a NUL byte (\\0) at character {line.index(chr(0)) + 1}; "
                                "the file is damaged or not text")
            yield line


def csv_records(path: Path, required: list[str], names: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, {column: value}) for each record of a CSV file with a header row.

    ``required`` columns must be in the header (``names`` maps them to the file's own column
    names); a column named twice, a record with too many or too few fields, or a field over
    csv's size limit is a DataError naming the line.
    """
    names = names or {}
    reader = csv.reader(utf8_lines(path))
    try:
        header = next(reader, [])
        if twice := sorted(c for c, n in Counter(header).items() if n > 1):
            raise DataError(f"{path}:1: column {twice[0]!r} appears {header.count(twice[0])} times in the header")
        if missing := [names.get(c, c) for c in required if names.get(c, c) not in header]:
            raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}; header is {header}")
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}), "
                                f"got {len(row)}")
            yield reader.line_num, dict(zip(header, row))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e}") from None


# --- from histories to training and evaluation examples -----------------------------------


def user_histories(interactions: list[Interaction]) -> dict[str, list[Interaction]]:
    """Each user's interactions oldest first, users in id order.

    The sort is stable: interactions with one timestamp keep their file order, so the split
    (and a reference model's copy of it) is one and the same everywhere.
    """
    users: dict[str, list[Interaction]] = {}
    for it in interactions:
        users.setdefault(it.user_id, []).append(it)
    ids = sorted(users, key=lambda u: int(u) if u.isdigit() else u)
    return {u: sorted(users[u], key=lambda it: it.timestamp) for u in ids}


def user_text(history: list[Interaction], catalog: Catalog, history_len: int) -> str:
    """A user as text: their last ``history_len`` items, most recent last.

    Each entry carries title, year, genres and the rating, and the user's own words
    when the data has them.
    """
    parts = []
    for it in history[-history_len:]:
        item = catalog.items[catalog.index[it.item_id]]
        entry = item.text()
        if it.rating is not None:
            entry += f". Rated {it.rating:g}/5"
        if it.text:
            entry += f'. "{it.text}"'
        parts.append(entry)
    return "; ".join(parts)


@dataclass(frozen=True)
class Example:
    text: str  # the user's history before the target, as text
    target: int  # catalog index of the next item
    seen: tuple[int, ...]  # catalog indices of the history, excluded from ranking
    user: str = ""  # whose example it is: user-level DP samples and clips by user


def privacy_units(examples: list[Example], unit: str) -> list[list[int]]:
    """The indices of ``examples`` grouped into privacy units: one per example, or one per user
    (in order of first appearance)."""
    if unit == "example":
        return [[i] for i in range(len(examples))]
    users: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        users.setdefault(ex.user, []).append(i)
    return list(users.values())


def leave_last_out(
    users: dict[str, list[Interaction]], catalog: Catalog, history_len: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Per user: last interaction -> test, second-to-last -> validation, the rest train.

    Training examples predict every training interaction from those before it; the
    validation and test items never appear in a training example. Users with fewer
    than 3 interactions only contribute training examples.
    """
    train, valid, test = [], [], []
    for user, history in users.items():
        idx = [catalog.index[it.item_id] for it in history]
        n = len(history)
        n_train = n - 2 if n >= 3 else n
        def example(t: int) -> Example:  # predict interaction t from those before it
            return Example(user_text(history[:t], catalog, history_len), idx[t], tuple(idx[:t]), user)

        train.extend(example(t) for t in range(1, n_train))
        if n >= 3:
            valid.append(example(n - 2))
            test.append(example(n - 1))
    return train, valid, test


def catalog_fingerprint(catalog: Catalog) -> str:
    """SHA-256 of the catalog in order: score column i must mean the same item on both sides."""
    import hashlib

    h = hashlib.sha256()
    for item in catalog.items:
        h.update(f"{item.item_id}\t{item.text()}\n".encode())
    return h.hexdigest()
