"""The auditor's command: ``fedrec audit RUN_DIR [--empirical]`` (audit/report.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from common.cli import console, fail


def register(commands) -> None:
    p = commands.add_parser("audit", help="recompute every ε of a run from its ledger; write report.html/json")
    p.add_argument("run_dir")
    p.add_argument("--empirical", action="store_true",
                   help="also run the one-run canary audit (a simulation run with --set canaries=N)")
    p.set_defaults(func=audit_cmd)


def audit_cmd(args) -> int:
    from audit.report import main as audit_main

    run_dir = Path(args.run_dir)
    try:
        return audit_main(run_dir, console, args.empirical)
    except (FileNotFoundError, sqlite3.DatabaseError) as e:
        fail(f"{run_dir}: {e}")
