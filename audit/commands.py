"""The auditor's commands: ``fedrec audit RUN_DIR [--empirical]`` (audit/report.py), and a site's
own audit, ``fedrec client audit DATA_DIR [--ledger RUN_DIR]`` (audit/site.py): the auditor's code,
which shares none of the node's, in the site's command group."""

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


def register_site(client) -> None:
    p = client.add_parser("audit", help="everything this site released, with what ε; compared with a run's ledger")
    p.add_argument("data_dir", help="the site's data folder (SuperNode --node-config data-dir)")
    p.add_argument("--state-dir", help="its state folder (default DATA_DIR/state; a simulated site's is "
                                       "DATA_DIR/state/RUN_NAME)")
    p.add_argument("--ledger", metavar="RUN_DIR", help="a run directory whose ledger.sqlite to compare with")
    p.add_argument("--json", help="also write the audit as JSON to this file")
    p.set_defaults(func=site_audit_cmd)


def site_audit_cmd(args) -> int:
    from audit.site import main as site_main

    try:
        return site_main(Path(args.data_dir), args.state_dir and Path(args.state_dir),
                         args.ledger and Path(args.ledger), args.json and Path(args.json), console)
    except KeyError as e:
        fail(f"{args.data_dir}: a record of this site lacks the field {e} (written before fedrec kept it?)")
    except (FileNotFoundError, ValueError, sqlite3.DatabaseError) as e:
        fail(f"{args.data_dir}: {e}")
