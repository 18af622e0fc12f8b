"""Flower's Deployment Engine on localhost: a real SuperLink and real SuperNodes, TLS and
SuperNode authentication on, the real app, canaries in the sites' private text."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from common.config import Settings, defaults
from common.data import read_catalog
from deployment.localhost import LocalDeployment
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


def server_side_files(root: Path, run: str = "run") -> list[Path]:
    """Everything the server side holds: run directory, SuperLink database and logs, CLI output."""
    files = [p for p in (root / run).rglob("*") if p.is_file()]
    files += [p for p in root.glob("superlink.db*") if p.is_file()]
    files += [root / "logs" / name for name in ("superlink.log", "flwr-run.log")]
    return files


def exited(proc, timeout: float = 90) -> int | None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    return proc.poll()


def break_a_row(data_dir: Path) -> str:
    """Make one row of this site's data malformed, with a canary in the bad field."""
    path = data_dir / "interactions.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    canary = f"{CANARY}{secrets.token_hex(6)}"
    fields = lines[5].split(",")
    fields[2] = canary  # the rating: not a number
    lines[5] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return canary


def first_run_history(s: Settings, declared: int) -> list:
    """What one 1-round run releases at a site: prior, DP-SGD, noisy count, evaluation."""
    return [(s.prior_noise_multiplier, 1.0, 1), (s.noise_multiplier, s.batch_size / declared, s.local_steps),
            (s.count_noise_multiplier, 1.0, 1), (s.eval_noise_multiplier, 1.0, 1)]


def test_deployment_with_tls_node_auth_lifetime_budgets_and_nothing_private_leaving_the_sites(tmp_path, app_dir,
                                                                                           fedrec_here):
    """Three runs with different run directories against the same SuperNodes: each site's
    accountant belongs to the site and composes them all; site 0 can afford exactly two, and
    declines the third. A third site's data has a malformed row with a canary: the server
    learns only an error category. TLS and SuperNode authentication are on throughout."""
    from common.privacy import epsilon, load_history, read_budget

    s = Settings.from_run_config({**defaults(), "max-users": 45, "partition-dir": str(tmp_path / "data")})
    materialize(s, 3)
    sites = [tmp_path / "data" / f"client-{k}" for k in range(3)]
    canaries = [c for site in sites[:2] for c in plant_canaries(site)]
    bad_row = break_a_row(sites[2])
    overrides = {"model-layers": 2, "lora-layers": 1, "num-server-rounds": 1, "local-steps": 2, "batch-size": 8,
                 "max-users": 45}
    run_s = Settings.from_run_config({**defaults(), **overrides})
    two_runs = first_run_history(run_s, read_budget(sites[0], {}).declared_examples) * 2
    site0_budget = epsilon(two_runs, 1e-5, run_s.accountant) * (1 + 1e-9)
    budgets = [(site0_budget, 1e-5), (7.5, 1e-6), (8.0, 1e-5)]  # each site's own, through --node-config
    started = []
    with LocalDeployment(tmp_path, sites, budgets=budgets) as d:
        started = list(d.processes)
        d.wait_for_nodes(3)
        # A site whose key was never registered is refused by the SuperLink.
        rogue_key = d.certs / "nodes" / "rogue"
        from deployment.credentials import make_node_key
        make_node_key(d.certs / "nodes", "rogue")
        rogue = d.start_supernode("rogue", sites[2], key=rogue_key.name, max_retries=1)
        # A site without the CA cannot verify the SuperLink's certificate.
        no_ca = d.start_supernode("no-ca", sites[0], key="site-0", ca=False, max_retries=1)
        assert exited(rogue) not in (None, 0)
        assert exited(no_ca) not in (None, 0)
        assert "No SuperNode found with the given public key" in d.log("superlink")
        assert "CERTIFICATE_VERIFY_FAILED" in d.log("no-ca")
        assert d.online_nodes() == 3

        for k in (1, 2, 3):  # run 3 needs all three sites: it stops once site 0 declines
            d.run({**overrides, "run-dir": str(tmp_path / f"run{k}"), "min-train-nodes": 3 if k == 3 else 2},
                  timeout=1200, app=str(app_dir))
        started = list(d.processes)

    # Every process the deployment started, and everything they started, is gone.
    time.sleep(1)
    assert not [p.pid for p in started if psutil.pid_exists(p.pid) and psutil.Process(p.pid).status() != "zombie"]

    rows = {k: [json.loads(line) for line in (tmp_path / f"run{k}" / "metrics.jsonl").read_text().splitlines()]
            for k in (1, 2)}
    for k in (1, 2):
        assert [(r["round"], r["clients"], r["failures"]) for r in rows[k]] == [(1, 2, 1)]
        assert rows[k][0]["metrics-source"].startswith("dp")  # deployed sites send no exact figure
        assert 0.0 <= rows[k][0]["val-ndcg@10"] <= 1.0 and "exact-val-ndcg@10" not in json.dumps(rows[k])
    # Each site accounted at its own δ and held its own ε_max, from its --node-config.
    assert sorted((c["epsilon-max"], c["delta"]) for c in rows[1][0]["client-updates"] if "delta" in c) == \
        sorted(budgets[:2])
    # Run 2 started where run 1 ended: its first release composes with all of run 1's.
    first = {c["delta"]: c["epsilon"] for c in json.loads((tmp_path / "run2" / "prior.json").read_text())
             ["client-updates"]}
    ended = {c["delta"]: c["epsilon"] for c in rows[1][0]["client-evaluations"]}
    assert set(first) == set(ended) == {1e-5, 1e-6}
    assert all(first[delta] > ended[delta] > 0 for delta in first)
    # One accountant per site, in the site's own folder, for all runs: both runs' releases.
    assert load_history(sites[0] / "state") == two_runs
    assert epsilon(load_history(sites[0] / "state"), 1e-5, run_s.accountant) <= site0_budget
    assert not (sites[0] / "state" / "run1").exists()
    # The catalog's frozen-prefix states (layer 0 carries no LoRA) were kept on the site's disk
    # by the first message that needed them and read by every later process: one file, the catalog's.
    (cached,) = (sites[0] / "state" / "prefix-cache").glob("catalog-*.pt")
    assert [text for text, _ in torch.load(cached)["keys"]] == read_catalog(tmp_path / "data" / "catalog.csv").texts()
    assert cached.stat().st_mtime < (tmp_path / "run2" / "config.json").stat().st_mtime  # run 2 read, never rewrote it
    # Each site ran behind its own preloaded SuperExec (--any-bundle), and every ClientApp it
    # forked ran the bundle Flower installed, not this checkout's copy.
    for k in range(3):
        ran_from = re.findall(r"the ClientApp ran from (\S+)", d.log(f"site-{k}-superexec"))
        assert ran_from and all(Path(f).is_relative_to(tmp_path / "flwr-home") for f in ran_from), ran_from
    # Run 2's ledger records run 1's releases (phase unrecorded), so its audit replays every ε
    # over the sites' whole lives and finds nothing.
    audit = fedrec_here("audit", tmp_path / "run2")
    assert audit.returncode == 0, audit.stdout[-3000:]
    report = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert {c["releases"] for c in report["clients"]} == {len(two_runs)}
    # Site 0's own audit, from its own records: both runs' releases, each found in run 2's ledger.
    own = fedrec_here("client", "audit", sites[0], "--ledger", tmp_path / "run2", "--json", tmp_path / "site0.json")
    assert own.returncode == 0, own.stdout[-3000:]
    site0 = json.loads((tmp_path / "site0.json").read_text())
    assert [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in site0["releases"]] == two_runs
    assert [r["run"] for r in site0["releases"]] == ["run1"] * 4 + ["run2"] * 4
    assert [r["mechanism"] for r in site0["releases"][:4]] == ["gaussian-histogram", "dp-sgd", "gaussian-count",
                                                               "gaussian-eval-sums"]
    # Run 3 would take site 0 past its budget: it declined, spent nothing, and the run stopped.
    prior3 = json.loads((tmp_path / "run3" / "prior.json").read_text())
    assert prior3["answered"] == 1 and len(prior3["declined"]) == 1 and "over epsilon-max" in prior3["declined"][0]
    assert "privacy budget left" in json.loads((tmp_path / "run3" / "summary.json").read_text())["stopped"]
    assert len(load_history(sites[0] / "state")) == len(two_runs)

    # The broken site failed with a category only; the detail (with the canary) stayed at the site.
    failed = [c for c in rows[1][0]["client-updates"] if "error" in c]
    assert failed and all(c["error"].startswith("site error (data)") for c in failed)
    assert bad_row in (sites[2] / "state" / "errors.log").read_text()

    # No private text reached the server side: not one canary, not even the prefix. The
    # SuperLink's database holds the messages that passed through it (the declared metrics'
    # names are there), so this also looks at what crossed the wire.
    server_side = [p for k in (1, 2, 3) for p in server_side_files(tmp_path, f"run{k}")]
    assert any(b"num-examples" in p.read_bytes() for p in server_side if p.name.startswith("superlink.db"))
    leaked = [p for p in server_side if CANARY.encode() in p.read_bytes()]
    assert leaked == []
    # ...while the canaries were really in what the clients trained on.
    assert len(canaries) > 100 and CANARY in (sites[0] / "interactions.csv").read_text()


def test_a_site_runs_only_the_bundle_it_approved(tmp_path, app_dir):
    """Which code a site runs, with real SuperLink and SuperNodes, three sites and two runs.

    - Site 0 pins nothing and trains in both runs.
    - Site 1 uses Flower's route, `flower-supernode --trusted-entities` with a reviewer's ed25519
      key. In Flower 1.41 only bundles fetched from Flower Hub carry signatures, so it refuses the
      bundle `flwr run` builds here, in both runs, and releases nothing.
    - Site 2 uses the site-side pin (client/approved_apps.py): its SuperNode runs with
      --isolation process and the site's own SuperExec, which launches a ClientApp only for a
      bundle whose SHA-256 a trusted key signed. The reviewer signed the bundle `flwr build` makes
      of this source: that run trains there. The same source with one comment added is refused:
      the site answers with that error at once (no round-timeout waited out) and releases nothing.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from common.privacy import load_history
    from deployment.credentials import make_node_key

    s = Settings.from_run_config({**defaults(), "max-users": 30, "partition-dir": str(tmp_path / "data")})
    materialize(s, 3)
    sites = [tmp_path / "data" / f"client-{k}" for k in range(3)]
    reviewer = ed25519.Ed25519PrivateKey.generate()
    key = tmp_path / "reviewer"
    key.write_bytes(reviewer.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    public = reviewer.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH).decode()
    trusted = tmp_path / "trusted-keys.yaml"  # Flower's trusted-entities format, read by both routes
    trusted.write_text(f'reviewer: "{public}"\n')
    altered = shutil.copytree(app_dir, tmp_path / "altered")
    with open(altered / "client" / "client_app.py", "a") as f:
        f.write("# one comment more than the reviewed source\n")
    fabs = {}
    for name, source in (("reviewed", app_dir), ("altered", altered)):
        (tmp_path / name / "fab").mkdir(parents=True)
        subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(source)],
                       cwd=tmp_path / name / "fab", check=True, capture_output=True)
        (fabs[name],) = (tmp_path / name / "fab").glob("*.fab")
    approve = subprocess.run([sys.executable, "-m", "common.cli", "client", "approve", str(fabs["reviewed"]),
                              "--key", str(key), "--key-id", "reviewer", "--approvals", str(tmp_path / "approvals")],
                             capture_output=True, text=True)
    assert approve.returncode == 0, approve.stdout + approve.stderr

    overrides = {"model-layers": 2, "lora-layers": 1, "num-server-rounds": 1, "local-steps": 2, "batch-size": 8,
                 "max-users": 30, "min-train-nodes": 1, "popularity-prior": False, "round-timeout": 30}
    with LocalDeployment(tmp_path, sites[:2], trusted_entities={1: trusted}) as d:
        d.flwr("supernode", "register", str(make_node_key(d.certs / "nodes", "site-2")), "onprem")
        d.start_site("site-2", sites[2], approvals=(tmp_path / "approvals", trusted))
        d.wait_for_nodes(3)
        d.run({**overrides, "run-dir": str(tmp_path / "run-reviewed")}, timeout=900, app=str(app_dir))
        released = len(load_history(sites[2] / "state"))
        d.run({**overrides, "run-dir": str(tmp_path / "run-altered")}, timeout=900, app=str(altered))
        flower_route, site_pin = d.log("site-1"), d.log("site-2-superexec")
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("run-reviewed", "run-altered")}
    assert [(r["clients"], r["failures"]) for r in rows["run-reviewed"]] == [(2, 1)]  # sites 0 and 2 trained
    assert [(r["clients"], r["failures"]) for r in rows["run-altered"]] == [(1, 2)]  # site 0 alone
    assert "App verification is not supported by the connected SuperLink" in flower_route
    assert not (sites[1] / "state" / "accountant.json").exists()
    assert released == 3  # the approved bundle ran at site 2: DP-SGD, count, evaluation
    assert len(load_history(sites[2] / "state")) == released  # the altered one released nothing there
    refusal = f"app bundle {hashlib.sha256(fabs['altered'].read_bytes()).hexdigest()} is not approved by this site"
    assert refusal in site_pin
    # Both refusing sites answered with their reason; neither left the server waiting.
    assert sorted(str(c.get("error")) for c in rows["run-altered"][0]["client-updates"]) == \
        ["None", "The FAB could not be verified.", refusal]
    # Site 2's SuperExec forks each ClientApp from a server that preloaded torch, Opacus, PEFT and
    # transformers; what ran was still the bundle Flower installed, not this checkout's copy.
    ran_from = re.findall(r"the ClientApp ran from (\S+)", site_pin)
    assert len(ran_from) == 2 and all(Path(f).is_relative_to(tmp_path / "flwr-home") for f in ran_from), ran_from
