"""A site's commands: ``fedrec client prepare | validate | reset-accountant`` (and ``audit``, the
auditor's code in this group: audit/commands.py).

    fedrec client prepare EXPORT --catalog CATALOG --out DIR   a raw CSV/JSONL export → the client format
    fedrec client validate DIR                                 check a data folder and summarise it
    fedrec client reset-accountant STATE_DIR --reason WHY      start a new privacy accountant (logged)

The folder they write is what the site's SuperNode is given: ``--node-config data-dir=DIR``.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from rich.table import Table

from common.cli import console, errors, fail


def register(commands) -> None:
    p = commands.add_parser("client", help="a site's tools: prepare an export, validate a folder, reset its accountant")
    client = p.add_subparsers(dest="client_command", required=True)
    c = client.add_parser("prepare", help="turn a raw CSV/JSONL export into the client data format")
    c.add_argument("export", help="the site's export: .csv with a header row, or .jsonl")
    c.add_argument("--catalog", required=True, help="the public catalog.csv every item must be in")
    c.add_argument("--out", required=True, help="the site's data folder (SuperNode --node-config data-dir)")
    c.add_argument("--columns", nargs="*", default=[], metavar="FIELD=COLUMN",
                   help="export column names, e.g. user_id=customer item_id=sku timestamp=ts text=review")
    c.add_argument("--drop-unknown", action="store_true", help="drop events of items not in the catalog (counted)")
    c.add_argument("--replace", action="store_true", help="replace prepared data (the old file is kept as a backup)")
    c.add_argument("--epsilon-max", type=float, help="also write budget.json: this site's ε limit")
    c.add_argument("--delta", type=float, default=1e-5, help="δ of the budget (default 1e-5)")
    c.add_argument("--declared-examples", type=int,
                   help="with --epsilon-max: the example count this site makes public (example-level DP-SGD "
                        "samples at batch-size / it)")
    c.add_argument("--declared-users", type=int,
                   help="with --epsilon-max: the user count this site makes public (user-level DP-SGD samples "
                        "users at batch-size / it)")
    c.add_argument("--privacy-unit", choices=["example", "user"],
                   help="with --epsilon-max: the one privacy unit this site releases at (default: the run's)")
    c.add_argument("--distributed-noise-max-sites", type=int,
                   help="with --epsilon-max: share DP-SGD's noise under SecAgg+ with at most this many sites "
                        "(distributed-noise runs; the site's own share is then σ/√T, T ≤ this); default: never")
    c.set_defaults(func=prepare_cmd)
    c = client.add_parser("reset-accountant", help="start a new privacy accountant for this site (logged)")
    c.add_argument("state_dir", help="the site's state folder (node-config state-dir, default DATA_DIR/state)")
    c.add_argument("--reason", required=True, help="why: written to accountant-log.jsonl with the retired ε")
    c.set_defaults(func=reset_cmd)
    c = client.add_parser("validate", help="check a site's data folder and summarise it")
    c.add_argument("dir")
    c.add_argument("--catalog", help="default: DIR/catalog.csv, else DIR/../catalog.csv")
    c.set_defaults(func=validate_cmd)
    c = client.add_parser("approve", help="approve a reviewed app bundle: sign its SHA-256 with an ed25519 key")
    c.add_argument("fab", help="the bundle `flwr build` wrote for the reviewed source")
    c.add_argument("--key", required=True, help="the reviewer's ed25519 private key (ssh-keygen -t ed25519)")
    c.add_argument("--key-id", required=True, help="the key's name in the site's trusted-keys file")
    c.add_argument("--approvals", required=True, help="the site's approvals folder")
    c.set_defaults(func=approve_cmd)
    c = client.add_parser("superexec", help="run the site's SuperExec: preloaded ClientApps, only approved bundles")
    c.add_argument("--runtime-api-address", required=True, help="the SuperNode's runtime API (--isolation process)")
    c.add_argument("--insecure", action="store_true", help="the runtime API is on localhost without TLS")
    c.add_argument("--approvals", help="folder of approvals (`fedrec client approve`)")
    c.add_argument("--trusted-keys", help="YAML of key-id: \"ssh-ed25519 …\" the site trusts")
    c.add_argument("--any-bundle", action="store_true",
                   help="no approvals: run every bundle the SuperNode accepts (preloaded all the same)")
    c.set_defaults(func=superexec_cmd)
    return client  # the site's group: `fedrec client audit` (audit/commands.py) joins it


def approve_cmd(args) -> int:
    from client.approved_apps import approve

    try:
        out = approve(Path(args.fab), Path(args.key), args.key_id, Path(args.approvals))
    except (OSError, ValueError) as e:
        fail(f"{args.fab}: {e}")
    console.print(f"approved: {out}")
    return 0


def superexec_cmd(args) -> int:
    from client.approved_apps import run_superexec, trusted_keys

    pinned = args.approvals is not None or args.trusted_keys is not None
    if pinned == args.any_bundle or (pinned and None in (args.approvals, args.trusted_keys)):
        fail("fedrec client superexec: give --approvals DIR and --trusted-keys KEYS.yaml, "
             "or --any-bundle to run every bundle the SuperNode accepts")
    if args.any_bundle:
        run_superexec(args.runtime_api_address, args.insecure, None, None)
        return 0
    try:
        trusted_keys(Path(args.trusted_keys))
    except (OSError, ValueError) as e:
        fail(f"{args.trusted_keys}: {e}")
    run_superexec(args.runtime_api_address, args.insecure, Path(args.approvals), Path(args.trusted_keys))
    return 0


def prepare_cmd(args) -> int:
    from client.prepare import parse_columns, prepare
    from common.data import DataError
    from common.privacy import Budget

    budget = None
    if args.epsilon_max is not None:
        if not (args.epsilon_max > 0 and 0 < args.delta < 1):
            fail(f"--epsilon-max {args.epsilon_max:g} --delta {args.delta:g}: need ε_max > 0 and 0 < δ < 1")
        for flag, value in (("--declared-examples", args.declared_examples), ("--declared-users", args.declared_users)):
            if value is not None and value < 1:
                fail(f"{flag} {value}: must be >= 1")
        if args.distributed_noise_max_sites is not None and args.distributed_noise_max_sites < 2:
            fail(f"--distributed-noise-max-sites {args.distributed_noise_max_sites}: must be >= 2")
        budget = Budget(args.epsilon_max, args.delta, declared_examples=args.declared_examples,
                        declared_users=args.declared_users, privacy_unit=args.privacy_unit,
                        distributed_noise_max_sites=args.distributed_noise_max_sites)
    try:
        done = prepare(Path(args.export), Path(args.catalog), Path(args.out), parse_columns(args.columns),
                       drop_unknown=args.drop_unknown, replace=args.replace, budget=budget)
    except (DataError, OSError) as e:
        fail(str(e))
    dropped = f", {done['dropped-unknown']} events of unknown items dropped" if done["dropped-unknown"] else ""
    console.print(f"Prepared {done['events']} events of {done['users']} users in {done['out']}{dropped}.")
    return 0


def reset_cmd(args) -> int:
    from common.privacy import ACCOUNTANT_LOG, retire_accountant

    retired = retire_accountant(Path(args.state_dir), args.reason)
    console.print(f"A new accountant starts at ε = 0 in {args.state_dir}; "
                  + (f"the old one is kept as {retired}" if retired else "there was none before")
                  + f"; logged in {ACCOUNTANT_LOG}.")
    return 0


def validate_cmd(args) -> int:
    from client.prepare import validate
    from common.data import DataError

    try:
        summary = validate(Path(args.dir), Path(args.catalog) if args.catalog else None)
    except DataError as e:
        fail(str(e))

    def day(t):
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).date().isoformat() if t is not None else "—"

    table = Table(title=f"{args.dir}", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    for name, value in [("users", summary.users), ("  with ≥ 3 events (evaluated)", summary.evaluable_users),
                        ("events", summary.events), ("  rated", summary.rated), ("  implicit", summary.implicit),
                        ("  with text", summary.with_text), ("date range", f"{day(summary.first)} – {day(summary.last)}"),
                        ("unknown items", summary.unknown_items), ("privacy budget", summary.budget)]:
        table.add_row(name, str(value))
    console.print(table)
    if summary.problems:
        for problem in summary.problems:  # one line each on stderr, never wrapped: grep-able in a pipe
            errors.print(problem, style="red", markup=False, soft_wrap=True)
        fail(f"{args.dir}: {len(summary.problems)} problem(s) shown above (at most 20 listed)")
    console.print("OK: this folder can be given to a SuperNode as --node-config data-dir=...")
    return 0
