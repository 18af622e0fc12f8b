"""Setting up a federation: ``fedrec credentials`` and ``fedrec localhost``.

    fedrec credentials DIR --host NAME ... --nodes SITE ...   TLS CA + SuperLink certificate, SuperNode keys
    fedrec localhost SITE_DIR ... [--rounds N] [--set k=v]    a real SuperLink + SuperNodes on this machine
"""

from __future__ import annotations

from pathlib import Path

from common.cli import console, fail


def register(commands) -> None:
    p = commands.add_parser("credentials", help="TLS CA and SuperLink certificate, and SuperNode key pairs")
    p.add_argument("dir")
    p.add_argument("--host", action="append", default=[], help="a name or IP the SuperLink is reached at (repeat)")
    p.add_argument("--nodes", nargs="*", default=[], metavar="SITE", help="make a key pair per site name")
    p.set_defaults(func=credentials_cmd)
    p = commands.add_parser("localhost", help="deploy on this machine: a SuperLink, one SuperNode per site folder")
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
    from deployment.localhost import localhost_cmd as run

    return run(args)
