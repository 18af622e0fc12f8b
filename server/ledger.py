"""The privacy ledger: an append-only SQLite record of every round of a run.

``RUN_DIR/ledger.sqlite`` holds, per round, who took part (pseudonymous node ids), every
privacy mechanism a client ran with its parameters, the ε each client reported and how many
releases of its history that ε covers (``releases``), the norm
of each client's update, declines and failures with their reasons, and the round's
evaluation metrics. A round is written in one transaction when it commits, so a crash
loses at most the round in flight. Rows are never updated or deleted (triggers refuse it).

``fedrec audit`` reads this file back and recomputes every ε from the mechanisms alone.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, committed_at REAL NOT NULL, participants INTEGER NOT NULL,
    declined INTEGER NOT NULL, failed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS participants (
    round INTEGER NOT NULL, node TEXT NOT NULL, phase TEXT NOT NULL, status TEXT NOT NULL,
    reason TEXT, num_examples INTEGER, epsilon REAL, delta REAL, epsilon_max REAL,
    update_norm REAL, releases INTEGER, PRIMARY KEY (round, node, phase));
CREATE TABLE IF NOT EXISTS mechanisms (
    round INTEGER NOT NULL, node TEXT NOT NULL, phase TEXT NOT NULL, mechanism TEXT NOT NULL,
    noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
    max_grad_norm REAL, delta REAL NOT NULL, accountant TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (round INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (round, name));
"""
APPEND_ONLY = "".join(
    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op} BEFORE {op.upper()} ON {table} "
    f"BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;"
    for table in ("rounds", "participants", "mechanisms", "metrics") for op in ("update", "delete")
)


def pseudonym(key: int | str, client: int | str) -> str:
    """A stable per-run pseudonym for a client (its own ``client-id``, or the Flower node id of
    one that never sent it): neither id is written anywhere. ``key`` is the ledger's own."""
    return "node-" + hashlib.sha256(f"{key}:{client}".encode()).hexdigest()[:12]


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions
        self.db.execute("PRAGMA synchronous=FULL")  # a committed round survives a power cut
        self.db.executescript(SCHEMA + APPEND_ONLY)

    def set_meta(self, **values) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for key, value in values.items():
                self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def last_round(self) -> int | None:
        """The last committed round (0 = the popularity prior), None if none committed."""
        return self.db.execute("SELECT MAX(round) FROM rounds").fetchone()[0]

    def releases(self, node: str) -> list[tuple[float, float, int]]:
        """The (σ, q, steps) of every mechanism recorded for ``node``, in order."""
        return [tuple(r) for r in self.db.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM mechanisms WHERE node = ? ORDER BY round, rowid",
            (node,))]

    def commit_round(self, server_round: int, participants: list[dict], mechanisms: list[dict],
                     metrics: dict[str, float]) -> None:
        """Write one round in one transaction: all of it lands, or none of it."""
        status = [p["status"] for p in participants]
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT INTO rounds VALUES (?, ?, ?, ?, ?)", (
                server_round, time.time(), status.count("trained") + status.count("answered"),
                status.count("declined"), status.count("failed")))
            for p in participants:
                self.db.execute(
                    "INSERT INTO participants VALUES (:round, :node, :phase, :status, :reason, :num_examples,"
                    " :epsilon, :delta, :epsilon_max, :update_norm, :releases)",
                    {"round": server_round, "reason": None, "num_examples": None, "epsilon": None, "delta": None,
                     "epsilon_max": None, "update_norm": None, "releases": None, **p})
            for m in mechanisms:
                self.db.execute(
                    "INSERT INTO mechanisms VALUES (:round, :node, :phase, :mechanism, :noise_multiplier,"
                    " :sample_rate, :steps, :max_grad_norm, :delta, :accountant)",
                    {"round": server_round, "max_grad_norm": None, **m})
            for name, value in metrics.items():
                self.db.execute("INSERT INTO metrics VALUES (?, ?, ?)", (server_round, name, value))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()
