"""Setting up a federation: ``fedrec credentials`` and ``fedrec localhost``.

    fedrec credentials DIR --host NAME ... --nodes SITE ...   TLS CA + SuperLink certificate, SuperNode keys
    fedrec localhost SITE_DIR ... [--rounds N] [--set k=v]    a real SuperLink + SuperNodes on this machine
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common.cli import console, fail


def register(commands) -> None:
    p = commands.add_parser("credentials", help="TLS CA and SuperLink certificate, and SuperNode key pairs")
    p.add_argument("dir")
    p.add_argument("--host", action="append", default=[], help="a name or IP the SuperLink is reached at (repeat)")
    p.add_argument("--nodes", nargs="*", default=[], metavar="SITE", help="make a key pair per site name")
    p.set_defaults(func=credentials_cmd)
    p = commands.add_parser("localhost", help="deploy on this machine: a SuperLink, one SuperNode and its "
                                              "preloaded SuperExec per site folder")
    p.add_argument("sites", nargs="+", metavar="SITE_DIR", help="each site's data folder (--node-config data-dir)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--root", type=Path, default=None, help="working folder (default: a new one in /tmp)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    p.set_defaults(func=localhost_cmd)


def credentials_cmd(args) -> int:
    from deployment.credentials import make_node_key, make_tls

    out = Path(args.dir)
    if not args.host and not args.nodes:
        fail("nothing to make: give --host NAME (TLS) and/or --nodes SITE (SuperNode keys)")
    try:
        if args.host:
            make_tls(out, args.host)
            console.print(f"{out}/ca.crt, ca.key, server.pem, server.key (SANs: {', '.join(args.host)})")
        for name in args.nodes:
            console.print(f"{make_node_key(out / 'nodes', name)} (register it: flwr supernode register <it>)")
    except (FileExistsError, ValueError) as e:
        fail(str(e))
    return 0


def localhost_cmd(args) -> int:
    """``fedrec localhost``: deploy, run, print each site's traffic."""
    from rich.table import Table

    from common.config import ConfigError, parse_overrides
    from deployment.localhost import deploy

    sites = [Path(d).resolve() for d in args.sites]
    if missing := [str(d) for d in sites if not (d / "interactions.csv").is_file()]:
        fail(f"not a site's data folder (no interactions.csv): {', '.join(missing)}; "
             "write one with fedrec client prepare or python -m simulations.partition")
    root = (args.root or Path(f"/tmp/fedrec-localhost-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
    if root.exists() and any(root.iterdir()):
        fail(f"--root {root}: not empty; choose a new folder")
    try:
        overrides = {**parse_overrides(args.set), "num-server-rounds": args.rounds, "run-dir": str(root / "run")}
    except ConfigError as e:
        fail(str(e))
    figures = deploy(root, sites, overrides)
    table = Table(title=f"Localhost deployment: {len(sites)} SuperNodes, TLS + node auth, {figures['rounds']} rounds")
    for col in ("site", "sent (MB)", "received (MB)"):
        table.add_column(col, justify="right")
    for name, w in figures["wire-bytes"].items():
        table.add_row(name, f"{w['sent'] / 1e6:.2f}", f"{w['received'] / 1e6:.2f}")
    console.print(table)
    for name, w in figures["wire-bytes-per-round"].items():
        console.print(f"{name}, rounds 2..R: sent {[round(b / 1e3) for b in w['sent']]} kB, "
                      f"received {[round(b / 1e3) for b in w['received']]} kB per round")
    console.print(f"wall {figures['wall-s']} s; round 1 ended at {figures['first-round-s']} s, later rounds took "
                  f"{figures['round-s']} s; adapter {figures['adapter-bytes'] / 1e6:.2f} MB; run directory {root / 'run'}")
    (root / "localhost.json").write_text(json.dumps(figures, indent=1))
    return 0
