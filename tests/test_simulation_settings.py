"""Real Flower simulations, one per test, each with its own settings: a site's budget ends the
run; one client per user with central DP at the server; user-level DP at the sites. Apart from
test_simulation.py so that pytest-xdist (``--dist loadfile``) runs them beside its shared run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.config import Settings
from common.privacy import epsilon


def test_clients_enforce_their_budgets_and_the_run_stops_cleanly(tmp_path, fedrec_here):
    """Client 0 can afford the prior and one round. It declines round 2; with min-train-nodes 3
    the run cannot sample round 3 and stops, saying why; the audit still passes. Under SecAgg+,
    whose protocol has no place for a decline: the decline is asked before it starts
    (query.price), so it is recorded as a decline, not a dropout, and the others' round goes on."""
    import sqlite3

    from common.config import defaults
    from common.privacy import Budget, read_budget, write_budget
    from simulations.partition import materialize

    overrides = {"model-layers": 2, "lora-layers": 1, "max-users": 24, "batch-size": 8, "max-length": 64, "history-len": 4, "fraction-train": 1.0,
                 "local-steps": 3, "min-train-nodes": 3, "partition-dir": str(tmp_path / "parts"),
                 "secure-aggregation": True, "secagg-max-weight": 2000.0}
    s = Settings.from_run_config({**defaults(), **overrides})
    root = materialize(s, 3)
    declared = read_budget(root / "client-0", {}).declared_examples
    one_round = [(s.prior_noise_multiplier, 1.0, 1), (s.noise_multiplier, s.batch_size / declared, 3),
                 (s.count_noise_multiplier, 1.0, 1), (s.eval_noise_multiplier, 1.0, 1)]
    budget = epsilon(one_round, 1e-5, "prv") * (1 + 1e-9)
    write_budget(root / "client-0", Budget(budget, 1e-5, declared_examples=declared))

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", "3", "--clients", "3", "--run-dir", str(run),
           "--set", *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())]
    proc = subprocess.run(cmd, env={**os.environ, "FEDREC_HOME": str(tmp_path / "home"), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "The run stopped after 2 of 3 rounds" in proc.stdout and "privacy budget left" in proc.stdout
    assert "privacy budget left" in json.loads((run / "summary.json").read_text())["stopped"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["declined"], r["failures"]) for r in rows] == [(3, 0, 0), (2, 1, 0)]
    assert "Secure aggregation completed" in (run / "flower.log").read_text()

    db = sqlite3.connect(run / "ledger.sqlite")
    (reason,) = db.execute("SELECT reason FROM participants WHERE status = 'declined'").fetchone()
    assert "over epsilon-max" in reason
    db.close()
    state = json.loads((root / "client-0" / "state" / "run" / "accountant.json").read_text())
    assert state["epsilon"] <= budget  # it never spent past its own budget
    assert fedrec_here("audit", run).returncode == 0


def test_one_client_per_user_with_central_dp_is_user_level_and_audited(tmp_path, fedrec_here):
    """Cross-device: one client per user, client-level DP at the server (= user-level here) on a
    real simulation. The prior is the server's release (unit-norm histograms, one N(0, σ_h²));
    then Poisson sampling at q = 4/8 each round. Every release is in the ledger, its ε printed
    apart from the clients' (user-level, said so) and recomputed by the audit."""
    import sqlite3

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", "3", "--clients", "8", "--run-dir", str(run),
           "--set", "model-layers=2", "lora-layers=1", "max-users=8", "partition=user", "batch-size=8", "max-length=64",
           "history-len=4", "local-steps=2", "fraction-train=0.6", "dp=false", "central-dp=true",
           "central-population=8", "central-noise-multiplier=1.5", "central-clipping-norm=5",
           "prior-noise-multiplier=2.0"]
    proc = subprocess.run(cmd, env={**os.environ, "FEDREC_HOME": str(tmp_path / "home"), "COLUMNS": "250"},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    central = [r["central-epsilon"] for r in rows]
    assert len(central) == 3 and 0 < central[0] < central[1] < central[2]
    # The prior (q = 1), then q = m/N = 4/8 three times, by Opacus' RDP for comparison.
    assert central[-1] == pytest.approx(epsilon([(2.0, 1.0, 1), (1.5, 0.5, 3)], 1e-5, "rdp"), rel=1e-3)
    assert all(0 <= r["central-clients"] == r["clients"] <= 8 for r in rows)
    assert json.loads((run / "prior.json").read_text())["answered"] == 8
    assert "Client-level privacy (server, a separate guarantee" in proc.stdout
    assert "one client is one user (partition = user), so it is user-level DP" in " ".join(proc.stdout.split())
    assert f"ε = {central[-1]:.3f} at δ = 1e-05" in proc.stdout

    db = sqlite3.connect(run / "ledger.sqlite")
    releases = db.execute("SELECT noise_multiplier, sample_rate, max_grad_norm, accountant FROM mechanisms "
                          "WHERE node = 'server' ORDER BY round").fetchall()
    db.close()
    assert releases == [(2.0, 1.0, 1.0, "flwr-rdp")] + [(1.5, 0.5, 5.0, "flwr-rdp")] * 3

    audit = fedrec_here("audit", run)
    assert audit.returncode == 0, audit.stdout[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["central"]["final-epsilon"] == pytest.approx(central[-1], rel=1e-3)
    assert report["central"]["releases"] == 4 and "user-level" in report["central"]["unit"]
    assert not report["findings"]
    assert "server" not in {c["node"] for c in report["clients"]}  # never mixed with the example-level ones
    assert "Client-level guarantee" in (run / "report.html").read_text()


def test_one_client_per_user_trains_the_sequence_tower_under_central_dp(tmp_path):
    """The cross-device route of the user-level results: one client per user trains the sequence
    tower on its own sequence (no DP-SGD), the server clips each update and adds one noise
    (client-level = user-level), and Adam at the server steps on the noisy mean. Only the tower
    moves: LoRA, the score scale and the item bias reach every round as the server sent them."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", "2", "--clients", "8", "--run-dir", str(run),
           "--set", "model-layers=2", "lora-layers=1", "max-users=8", "partition=user", "dp=false", "central-dp=true",
           "central-population=8", "fraction-train=0.5", "central-noise-multiplier=1.2", "central-clipping-norm=0.1",
           "prior-noise-multiplier=4.0", "sequence-training=true", "sequence-length=20", "sequence-dim=16",
           "local-steps=3", "learning-rate=0.003", "server-optimizer=adam", "server-learning-rate=0.003",
           "fraction-evaluate=0.0"]
    proc = subprocess.run(cmd, env={**os.environ, "FEDREC_HOME": str(tmp_path / "home"), "COLUMNS": "250"},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["central-epsilon"] == pytest.approx(epsilon([(4.0, 1.0, 1), (1.2, 0.5, 2)], 1e-5, "rdp"), rel=1e-3)
    assert all(r["central-clients"] == r["clients"] for r in rows) and sum(r["clients"] for r in rows) > 0
    start, end = (load_file(run / "adapters" / f"round-{r:03d}" / "adapter_model.safetensors") for r in (0, 2))
    tower = {k for k in start if ".sequence." in k}
    assert tower and all(not start[k].equal(end[k]) for k in tower)
    assert all(start[k].equal(end[k]) for k in set(start) - tower)
    assert (run / "adapters" / "round-002" / "server-optimizer.pt").is_file()


def test_a_user_level_run_is_user_level_from_the_sites_to_the_audit(tmp_path, fedrec_here):
    """privacy-unit = user on a real simulation with user-level canaries (3 examples each): each
    site's accountant, the ledger, the printed statement and `fedrec audit --empirical` all speak
    of users, every site's ε replays, and the canary bound stays below the user-level ε."""
    import sqlite3

    run, home = tmp_path / "run", tmp_path / "home"
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", "2", "--clients", "3", "--run-dir", str(run),
           "--set", "model-layers=2", "lora-layers=1", "max-users=24", "max-length=64", "history-len=4", "privacy-unit=user",
           "batch-size=3", "examples-per-user=2", "local-steps=3", "noise-multiplier=1.5",
           "prior-noise-multiplier=1.5", "canaries=12", "canary-examples=3"]
    proc = subprocess.run(cmd, env={**os.environ, "FEDREC_HOME": str(home), "COLUMNS": "250"},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    statement = " ".join(proc.stdout.split())
    assert "user-level (all the data of one user at one site" in statement and "every user count" in statement
    (site_state,) = {p.parent for p in home.glob("partitions/*/client-0/state/run/accountant.json")}
    stored = json.loads((site_state / "accountant.json").read_text())
    assert stored["privacy-unit"] == "user"
    # What `python -m simulations.study` plans a site to release is what a site released.
    from simulations.study import site_history

    s = Settings.from_run_config(json.loads((run / "config.json").read_text())["run-config"])
    assert sorted(site_history(s, declared=8)) == sorted(tuple(step) for step in stored["history"])
    db = sqlite3.connect(run / "ledger.sqlite")
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    rates = {q for (q,) in db.execute("SELECT sample_rate FROM mechanisms WHERE mechanism = 'dp-sgd'")}
    db.close()
    assert json.loads(meta["privacy-unit"]) == "user" and "one user at one site" in meta["adjacency"]
    assert rates == {3 / 8}  # q = batch-size / declared-users: the split's 24 users over 3 sites (canaries aside)

    audit = fedrec_here("audit", "--empirical", run)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["privacy-unit"] == "user" and not report["findings"]
    assert any("several sites" in line for line in report["not-covered"])
    assert report["empirical"]["canaries"] == 12
    assert report["empirical"]["epsilon-lb"] <= max(c["final-epsilon"] for c in report["clients"])
