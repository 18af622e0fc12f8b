"""Flower's Deployment Engine on localhost: a real SuperLink and real SuperNodes, TLS and
SuperNode authentication on, the real app, canaries in the sites' private text."""

from __future__ import annotations

import csv
import json
import secrets
import time
from pathlib import Path

import psutil

from common.config import Settings, defaults
from simulations.localhost import LocalDeployment
from simulations.partition import materialize

CANARY = "zqcanary"  # a prefix no tokenizer, log line or float encoding produces by chance


def plant_canaries(data_dir: Path) -> list[str]:
    """Give every interaction of this site a unique free-text review that starts with CANARY."""
    path = data_dir / "interactions.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    canaries = []
    for row in rows:
        row["text"] = f"{CANARY}{secrets.token_hex(6)} loved this one"
        canaries.append(row["text"].split()[0])
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return canaries


def server_side_files(root: Path) -> list[Path]:
    """Everything the server side holds: run directory, SuperLink database and logs, CLI output."""
    files = [p for p in (root / "run").rglob("*") if p.is_file()]
    files += [p for p in root.glob("superlink.db*") if p.is_file()]
    files += [root / "logs" / name for name in ("superlink.log", "flwr-run.log")]
    return files


def exited(proc, timeout: float = 90) -> int | None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    return proc.poll()


def test_deployment_with_tls_node_auth_and_no_text_leaving_the_sites(tmp_path):
    s = Settings.from_run_config({**defaults(), "max-users": 45, "partition-dir": str(tmp_path / "data")})
    materialize(s, 3)
    sites = [tmp_path / "data" / f"client-{k}" for k in range(2)]
    canaries = [c for site in sites for c in plant_canaries(site)]
    overrides = {"model-layers": 2, "num-server-rounds": 2, "local-steps": 2, "batch-size": 8, "max-users": 45,
                 "run-dir": str(tmp_path / "run")}
    started = []
    budgets = [(6.5, 1e-5), (7.5, 1e-6)]  # each site's own, through --node-config (budget.json says 8.0)
    with LocalDeployment(tmp_path, sites, budgets=budgets) as d:
        started = list(d.processes)
        d.wait_for_nodes(2)
        # A site whose key was never registered is refused by the SuperLink.
        rogue_key = d.certs / "nodes" / "rogue"
        from common.credentials import make_node_key
        make_node_key(d.certs / "nodes", "rogue")
        rogue = d.start_supernode("rogue", tmp_path / "data" / "client-2", key=rogue_key.name, max_retries=1)
        # A site without the CA cannot verify the SuperLink's certificate.
        no_ca = d.start_supernode("no-ca", sites[0], key="site-0", ca=False, max_retries=1)
        assert exited(rogue) not in (None, 0)
        assert exited(no_ca) not in (None, 0)
        assert "No SuperNode found with the given public key" in d.log("superlink")
        assert "CERTIFICATE_VERIFY_FAILED" in d.log("no-ca")
        assert d.online_nodes() == 2

        d.run(overrides, timeout=1200)
        started = list(d.processes)

    # Every process the deployment started, and everything they started, is gone.
    time.sleep(1)
    assert not [p.pid for p in started if psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != "zombie"]

    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients"] == 2 and r["failures"] == 0 for r in rows)
    assert 0 < rows[0]["epsilon-max"] < rows[1]["epsilon-max"] < 6.5  # cumulative, within budget
    # Each site accounted at its own δ and held its own ε_max, from its --node-config.
    assert sorted((c["epsilon-max"], c["delta"]) for c in rows[-1]["client-updates"]) == sorted(budgets)
    assert rows[-1]["eval-users"] > 0 and 0.0 <= rows[-1]["ndcg@10"] <= 1.0
    assert sorted(p.name for p in (run / "adapters").iterdir()) == ["round-000", "round-001", "round-002"]
    # Each site's accountant lives at the site, not at the server.
    assert all((site / "state" / "run").is_dir() for site in sites)

    # No private text reached the server side: not one canary, not even the prefix. The
    # SuperLink's database holds the messages that passed through it (the declared metrics'
    # names are there), so this also looks at what crossed the wire.
    server_side = server_side_files(tmp_path)
    assert any(b"num-examples" in p.read_bytes() for p in server_side if p.name.startswith("superlink.db"))
    leaked = [p for p in server_side if CANARY.encode() in p.read_bytes()]
    assert leaked == []
    # ...while the canaries were really in what the clients trained on.
    assert len(canaries) > 100 and CANARY in (sites[0] / "interactions.csv").read_text()
