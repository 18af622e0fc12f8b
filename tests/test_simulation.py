"""Integration: the real Flower simulation engine (Ray), real model, real data subset.

Runs ``fedrec simulate`` as a user would (a subprocess), then checks the run directory,
the metrics, the ε reported, that the saved adapter opens with PEFT, and ``fedrec recommend``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from common.config import Settings
from common.data import leave_last_out, read_catalog
from common.model import Recommender, load_encoder
from common.recommend import read_run
from audit.accountant import tolerance
from common.privacy import epsilon
from simulations.significance import main as significance, run_users

ROUNDS, CLIENTS, CANARIES, GRADIENT_CANARIES, LOCAL_STEPS = 2, 3, 60, 600, 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    run = base / "run"
    env = {**os.environ, "FEDREC_HOME": str(base / "home")}
    # Sites 0 and 1 lie about their DP-SGD noise (simulations/scenarios.py): 0 adds none, 1 adds σ·0.3,
    # both record σ. Everything but the white-box canary audit sees only what they record.
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--test", "--rounds", str(ROUNDS), "--clients", str(CLIENTS),
           "--run-dir", str(run), "--scenario", "0:no-noise", "1:under-noise", "--set", "model-layers=2",
           "max-users=24", "batch-size=15", "max-length=64", "history-len=4", "noise-multiplier=1.0",
           "fraction-train=1.0", f"local-steps={LOCAL_STEPS}", f"canaries={CANARIES}", f"gradient-canaries={GRADIENT_CANARIES}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, proc.stdout


def test_run_directory_layout(run_dir):
    run, stdout = run_dir
    for name in ("config.json", "catalog.csv", "metrics.jsonl", "summary.json", "flower.log", "prior.json"):
        assert (run / name).is_file(), name
    adapters = sorted(p.name for p in (run / "adapters").iterdir())
    assert adapters == [f"round-{r:03d}" for r in range(ROUNDS + 1)]
    for r in adapters:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "adapters" / r).iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["run-config"]["num-server-rounds"] == ROUNDS and config["run-config"]["dp"] is True
    assert len(config["base-sha256"]) == 64
    # The summary table and the privacy statement were printed.
    statement = " ".join(stdout.split())
    assert "popularity" in stdout and "δ = 1e-05" in statement and "PRV accountant" in statement
    assert "validation" in stdout and "test (read once)" in stdout
    for covered in ("popularity histogram", "every adapter", "every example count", "every evaluation"):
        assert covered in statement, covered


def test_metrics_every_round_from_all_clients_and_the_test_split_at_the_last_round_only(run_dir):
    """Validation every round; with --test the last round (only) is scored on the test split too,
    and its evaluation noise grows with the sums released: σ_e·√4 for one split, σ_e·√8 for two."""
    run, _ = run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    sigma_e = json.loads((run / "config.json").read_text())["run-config"]["eval-noise-multiplier"]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for r in rows:
        last = r["round"] == ROUNDS
        assert r["eval-splits"] == ("val,test" if last else "val")
        assert r["eval-noise-std-per-sum"] == pytest.approx(sigma_e * (8 if last else 4) ** 0.5)
        assert r["clients"] == CLIENTS and r["failures"] == 0
        assert r["metrics-source"].startswith("exact")
        for prefix in ("val-", "") if last else ("val-",):
            assert r[f"{prefix}eval-users"] == 24
            for k in ("hr@10", "ndcg@10", "recall@20"):
                for key in (f"{prefix}{k}", f"popularity-{prefix}{k}", f"dp-{prefix}{k}"):
                    assert 0.0 <= r[key] <= 1.0, key
            # The DP estimate is not the exact figure: noise went on every site's sums.
            assert r[f"dp-{prefix}eval-users"] != 24
            assert r[f"{prefix}hr@10"] <= r[f"{prefix}recall@20"]
        if not last:
            assert not {"ndcg@10", "dp-ndcg@10", "popularity-ndcg@10", "eval-users"} & set(r)
        assert sum(c["num-examples"] for c in r["client-updates"]) > 0


def test_epsilon_reported_is_cumulative_and_recomputable(run_dir):
    run, _ = run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_node = {}
    for r in rows:
        for c in r["client-updates"]:
            by_node.setdefault(c["node"], []).append(c)
    assert len(by_node) == CLIENTS
    for updates in by_node.values():
        assert len(updates) == ROUNDS
        assert updates[1]["epsilon"] > updates[0]["epsilon"] > 0
        assert updates[0]["delta"] == 1e-5
    prior = json.loads((run / "prior.json").read_text())
    assert prior["answered"] == CLIENTS and prior["noise-multiplier"] > 0
    prior_eps = {c["node"]: c["epsilon"] for c in prior["client-updates"]}
    eval_sigma = json.loads((run / "config.json").read_text())["run-config"]["eval-noise-multiplier"]
    for node, updates in by_node.items():
        assert updates[0]["epsilon"] > prior_eps[node] > 0
        # Recompute from the reported mechanisms: the prior's Gaussian histogram (q = 1, one
        # release), then per round DP-SGD, the noisy count, and (after training) the evaluation.
        history = [(prior["noise-multiplier"], 1.0, 1)]
        for u in updates:
            history += [(u["noise-multiplier"], u["sample-rate"], int(u["steps"])), (u["count-noise-multiplier"], 1.0, 1)]
            assert epsilon(history, 1e-5, "prv") == pytest.approx(u["epsilon"], rel=1e-9)
            history.append((eval_sigma, 1.0, 1))
        # q is public: the same for every site (batch-size / the split's mean size), whatever its size.
        assert len({u["sample-rate"] for u in updates}) == 1


def test_global_adapter_opens_with_peft_and_recommends(run_dir):
    run, _ = run_dir
    config = json.loads((run / "config.json").read_text())
    s = Settings.from_run_config(config["run-config"])
    catalog = read_catalog(run / "catalog.csv")
    encoder, _ = load_encoder(s.model, s.model_layers)
    model = PeftModel.from_pretrained(Recommender(encoder, len(catalog)), str(run / "adapters" / f"round-{ROUNDS:03d}"))
    lora = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    history = run.parent / "history.txt"
    history.write_text("# Star Wars, Empire, Return of the Jedi\n50,5\n172,5\n181,4\n")
    proc = subprocess.run([sys.executable, "-m", "common.cli", "recommend", str(run), "--history", str(history)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("│")]
    assert len(lines) == 10
    assert "Star Wars (1977)" not in proc.stdout  # items already in the history are not recommended


def test_initial_adapter_carries_the_dp_popularity_prior(run_dir):
    run, _ = run_dir
    initial = load_file(str(run / "adapters" / "round-000" / "adapter_model.safetensors"))
    (bias,) = [v for k, v in initial.items() if k.endswith("scorer.bias")]
    assert bias.shape == (1682,) and (bias >= 0).all() and bias.max() > 1.0
    final = load_file(str(run / "adapters" / f"round-{ROUNDS:03d}" / "adapter_model.safetensors"))
    (final_bias,) = [v for k, v in final.items() if k.endswith("scorer.bias")]
    # bias-learning-rate = 0 keeps the prior (FedAvg of equal values, up to float rounding)
    assert torch.allclose(final_bias, bias, rtol=1e-6, atol=0)


def test_ledger_holds_every_round_and_is_append_only(run_dir):
    import sqlite3

    run, _ = run_dir
    db = sqlite3.connect(run / "ledger.sqlite")
    assert [r for (r,) in db.execute("SELECT round FROM rounds ORDER BY round")] == list(range(ROUNDS + 1))
    trained = db.execute("SELECT round, node, num_examples, epsilon, delta, update_norm FROM participants "
                         "WHERE status = 'trained'").fetchall()
    assert len(trained) == ROUNDS * CLIENTS
    assert all(n > 0 and eps > 0 and delta == 1e-5 and norm > 0 for _, node, n, eps, delta, norm in trained)
    assert all(node.startswith("node-") for _, node, *_ in trained)  # pseudonyms, not Flower node ids
    mechs = db.execute("SELECT mechanism, noise_multiplier, sample_rate, steps FROM mechanisms").fetchall()
    assert sorted({m[0] for m in mechs}) == ["dp-sgd", "gaussian-count", "gaussian-eval-sums", "gaussian-histogram"]
    assert sum(m[0] == "gaussian-eval-sums" for m in mechs) == sum(m[0] == "gaussian-count" for m in mechs)
    assert sum(m[0] == "dp-sgd" for m in mechs) == ROUNDS * CLIENTS
    assert all(m[3] == LOCAL_STEPS and 0 < m[2] < 1 for m in mechs if m[0] == "dp-sgd")
    ndcg = db.execute("SELECT round, value FROM metrics WHERE name = 'val-ndcg@10' ORDER BY round").fetchall()
    assert [r for r, _ in ndcg] == list(range(1, ROUNDS + 1))
    test = db.execute("SELECT round FROM metrics WHERE name = 'ndcg@10' ORDER BY round").fetchall()
    assert test == [(ROUNDS,)]
    # The evaluation release's recorded sensitivity is that of the sums it carried: √4, then √8.
    sensitivity = db.execute("SELECT DISTINCT round, max_grad_norm FROM mechanisms WHERE mechanism = "
                             "'gaussian-eval-sums' ORDER BY round").fetchall()
    assert sensitivity == [(r, pytest.approx((8 if r == ROUNDS else 4) ** 0.5)) for r in range(1, ROUNDS + 1)]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE participants SET epsilon = 0.1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM mechanisms")
    db.close()


def run_audit(run):
    return subprocess.run([sys.executable, "-m", "common.cli", "audit", str(run)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_audit_recomputes_every_epsilon_and_passes(run_dir):
    run, _ = run_dir
    proc = run_audit(run)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    assert report["ok"] and not report["findings"]
    assert len(report["clients"]) == CLIENTS
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reported = sorted(c["epsilon"] for c in rows[-1]["client-updates"])
    recomputed = sorted(c["final-epsilon"] for c in report["clients"])
    evaluated = sorted(c["epsilon"] for c in rows[-1]["client-evaluations"])  # the last release of each site
    assert evaluated > reported
    # The sites' Opacus PRV against the auditor's dp-accounting PLD bound: PRV reports the upper end
    # of its 0.01 error bound, so it lies above the PLD bound and within the stated tolerance.
    for mine, theirs in zip(recomputed, evaluated):
        assert mine < theirs <= mine + tolerance("prv", mine)
    for c in report["clients"]:  # the exact ε lies between the optimistic and the pessimistic PLD estimates
        assert c["band"][0] < c["band"][1] == c["final-epsilon"] and c["band"][1] / c["band"][0] < 1.1
    status = {v["check"]: v["status"] for v in report["verified"]}
    assert status == {"accounting": "verified", "mechanisms": "verified", "budgets": "verified",
                      "sites' own records": "verified", "noise really added": "assumed",
                      "memorisation of released adapters": "not measured", "code the sites ran": "assumed",
                      "noise generator": "assumed"}
    assert len(report["sites"]) == CLIENTS and all(not site["findings"] for site in report["sites"])
    html = (run / "report.html").read_text()
    assert "Verified and assumed" in html
    assert html.count("data:image/png;base64,") == 3 and "Unit of privacy" in html and "Not covered" in html


@pytest.mark.parametrize("table, edit, finding", [
    # a client's report understated beyond the accountants' stated error (0.02 + 1e-3·ε for PRV)
    ("participants", "SET epsilon = epsilon * 0.8 - 0.03 WHERE rowid = (SELECT max(rowid) FROM participants)",
     "mismatch"),
    ("participants", "SET epsilon_max = epsilon * 0.5 WHERE rowid = (SELECT max(rowid) FROM participants)",
     "over-budget"),  # a budget it did not keep
    # a client that ran (or recorded) less noise, or more steps, than the run asked for
    ("mechanisms", "SET noise_multiplier = 0.5 WHERE rowid = (SELECT max(rowid) FROM mechanisms "
     "WHERE mechanism = 'dp-sgd')", "mechanism-differs"),
    ("mechanisms", "SET steps = steps + 1 WHERE rowid = (SELECT max(rowid) FROM mechanisms "
     "WHERE mechanism = 'dp-sgd')", "mechanism-differs"),
    ("mechanisms", "SET noise_multiplier = 2.0 WHERE mechanism = 'gaussian-eval-sums'", "mechanism-differs"),
])
def test_audit_detects_a_tampered_ledger(run_dir, tmp_path, fedrec_here, table, edit, finding):
    import sqlite3

    run, _ = run_dir
    copy = tmp_path / "tampered"
    shutil.copytree(run, copy)
    db = sqlite3.connect(copy / "ledger.sqlite")
    db.execute(f"DROP TRIGGER {table}_no_update")  # what someone editing the file by hand would do
    db.execute(f"UPDATE {table} {edit}")
    db.commit()
    db.close()
    proc = fedrec_here("audit", copy)
    assert proc.returncode == 1
    assert finding in proc.stdout
    kinds = {f["kind"] for f in json.loads((copy / "report.json").read_text())["findings"]}
    # A changed mechanism changes ε too, and the simulated sites' own records no longer match the ledger.
    assert finding in kinds and kinds <= {finding, "mismatch", "site-record"}, kinds


def site_folders(run):
    """(data folder, state folder) of each simulated site of ``run``."""
    home = run.parent / "home"
    return sorted((state.parent.parent, state) for state in home.glob(f"partitions/*/client-*/state/{run.name}"))


def run_site_audit(fedrec_here, data, state, ledger, out):
    return fedrec_here("client", "audit", data, "--state-dir", state, "--ledger", ledger, "--json", out)


def test_each_site_audits_its_own_releases_and_agrees_with_the_ledger(run_dir, tmp_path, fedrec_here):
    """`fedrec client audit` lists, from the site's own records, every release it made (prior,
    DP-SGD, count, evaluation sums per round) with its ε, and finds each one in the run's ledger."""
    import sqlite3

    run, _ = run_dir
    sites = site_folders(run)
    assert len(sites) == CLIENTS
    db = sqlite3.connect(run / "ledger.sqlite")
    for data, state in sites:
        proc = run_site_audit(fedrec_here, data, state, run, tmp_path / "site.json")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        report = json.loads((tmp_path / "site.json").read_text())
        assert report["ok"] and not report["ledger"]["not-in-ledger"]
        ledger_rows = db.execute("SELECT round, phase, mechanism, noise_multiplier, sample_rate, steps FROM mechanisms "
                                 "WHERE node = ? ORDER BY round, rowid", (report["ledger"]["name"],)).fetchall()
        site_rows = [(r["round"], r["phase"], r["mechanism"], r["noise_multiplier"], r["sample_rate"], r["steps"])
                     for r in report["releases"]]
        assert site_rows == ledger_rows and len(site_rows) == 1 + 3 * ROUNDS  # prior, then 3 per round
        assert {r["run"] for r in report["releases"]} == {run.name}
        accountant = json.loads((state / "accountant.json").read_text())
        assert report["epsilon-recorded"] == accountant["epsilon"]
        assert abs(report["epsilon-recomputed"] - accountant["epsilon"]) <= tolerance("prv", accountant["epsilon"])
    db.close()


@pytest.mark.parametrize("change, finding", [
    ("ledger-epsilon", "ledger-differs"),  # the ledger says the site reported another ε
    ("ledger-sigma", "ledger-differs"),  # the ledger records another σ for the site's DP-SGD
    ("log-line", "unlogged"),  # a charged release the site's log does not describe
])
def test_a_site_audit_flags_an_altered_record(run_dir, tmp_path, fedrec_here, change, finding):
    import sqlite3

    run, _ = run_dir
    data, state = site_folders(run)[0]
    copy_run, copy_state = tmp_path / "run", tmp_path / "state"
    copy_run.mkdir()
    shutil.copy(run / "ledger.sqlite", copy_run / "ledger.sqlite")
    shutil.copytree(state, copy_state)
    proc = run_site_audit(fedrec_here, data, copy_state, copy_run, tmp_path / "before.json")
    assert proc.returncode == 0, proc.stdout[-3000:]
    name = json.loads((tmp_path / "before.json").read_text())["ledger"]["name"]
    if change == "log-line":
        lines = (copy_state / "releases.jsonl").read_text().splitlines(keepends=True)
        (copy_state / "releases.jsonl").write_text("".join(lines[:2] + lines[3:]))
    else:
        db = sqlite3.connect(copy_run / "ledger.sqlite")
        table, edit = {"ledger-epsilon": ("participants", "epsilon = epsilon * 0.9"),
                       "ledger-sigma": ("mechanisms", "noise_multiplier = 2.0")}[change]
        db.execute(f"DROP TRIGGER {table}_no_update")
        db.execute(f"UPDATE {table} SET {edit} WHERE rowid = (SELECT max(rowid) FROM {table} WHERE node = ?"
                   + (" AND mechanism = 'dp-sgd')" if table == "mechanisms" else ")"), (name,))
        db.commit()
        db.close()
    proc = run_site_audit(fedrec_here, data, copy_state, copy_run, tmp_path / "after.json")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    kinds = {f["kind"] for f in json.loads((tmp_path / "after.json").read_text())["findings"]}
    assert finding in kinds and finding in proc.stdout, kinds


def test_empirical_audits_the_adapters_memory_and_catch_the_sites_that_under_noise(run_dir):
    """Both canary audits on the real run. Example canaries, scored from the released adapters:
    the lower bound stays below the largest proven client ε. White-box DP-SGD canaries, scored
    from each site's noisy sums: site 0 (no noise, the σ = 0 control) and site 1 (σ·0.3 while
    recording σ = 1) have ε_lb above the proven ε of their DP-SGD steps, and the audit exits 1
    naming exactly them; the honest site 2 stays below."""
    run, _ = run_dir
    proc = subprocess.run([sys.executable, "-m", "common.cli", "audit", "--empirical", str(run)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((run / "report.json").read_text())
    measured = report["empirical"]
    assert measured["canaries"] == CANARIES
    for values in measured["scores"].values():
        assert len(values["included"]) == measured["included"]
        assert len(values["excluded"]) == CANARIES - measured["included"]
    assert measured["proven-epsilon"] == pytest.approx(max(c["final-epsilon"] for c in report["clients"]))
    assert 0 <= measured["epsilon-lb"] <= measured["proven-epsilon"] and measured["below-proven"]
    assert "Empirical audit" in proc.stdout

    sites = {g["site"]: g for g in report["gradient-canaries"]}
    assert sorted(sites) == ["client-0", "client-1", "client-2"]
    assert {(g["steps"], g["canaries"]) for g in sites.values()} == {(LOCAL_STEPS * ROUNDS, GRADIENT_CANARIES)}
    proven = sites["client-2"]["proven-epsilon"]
    assert sites["client-0"]["epsilon-lb"] > 2 * proven  # the control: no noise at all
    assert sites["client-1"]["epsilon-lb"] > proven  # the liar
    assert sites["client-2"]["epsilon-lb"] <= proven  # the honest site
    flagged = [f for f in report["findings"] if f["kind"] == "noise-below-recorded"]
    assert sorted(f["site"] for f in flagged) == ["client-0", "client-1"]
    assert {f["node"] for f in flagged} == {sites["client-0"]["node"], sites["client-1"]["node"]}
    # Nothing else is wrong: every site's ledger rows say σ = 1, and every ε agrees with them.
    assert {f["kind"] for f in report["findings"]} == {"noise-below-recorded"}
    assert "its noise is below what it recorded" in " ".join(proc.stdout.split())
    status = {v["check"]: v["status"] for v in report["verified"]}
    assert status["noise really added"] == "failed" and status["accounting"] == "verified"
    html = (run / "report.html").read_text()
    assert "Empirical audit" in html and "White-box DP-SGD canaries" in html
    assert html.count("data:image/png;base64,") == 4


@pytest.mark.parametrize("split", ["validation", "test"])
def test_significance_rescores_the_run_exactly_and_bootstraps_the_lift(run_dir, tmp_path, split):
    """`python -m simulations.significance` re-scores the run's validation users (``--test``: its
    test users): its means equal what the clients reported for the last round on that split and
    what the partition's popularity reference says."""
    run, _ = run_dir
    out = tmp_path / "significance.json"
    proc = subprocess.run([sys.executable, "-m", "simulations.significance", str(run), "--resamples", "500",
                           "--out", str(out)] + (["--test"] if split == "test" else []), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "95 % interval of the lift" in proc.stdout and f"{split} users" in proc.stdout
    figures = json.loads(out.read_text())
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    prefix = "" if split == "test" else "val-"
    assert figures["split"] == split and figures["users"] == last[f"{prefix}eval-users"]
    for k in ("hr@10", "ndcg@10", "recall@20"):
        assert figures[k]["model"] == pytest.approx(last[f"{prefix}{k}"], abs=1e-9), k
        assert figures[k]["baseline"] == pytest.approx(last[f"popularity-{prefix}{k}"], abs=1e-12), k
        if figures[k]["baseline"] > 0:
            assert figures[k]["lift-low"] <= figures[k]["lift"] <= figures[k]["lift-high"], k
        else:  # 24 users: popularity may hit none of them, and a lift over 0 is undefined
            assert math.isnan(figures[k]["lift"]), k


def test_significance_against_an_earlier_round_pairs_the_runs_own_rounds(run_dir, tmp_path):
    """`--against R` bootstraps the last round against the same run's round R on the same users:
    the last round's side is what the clients reported on validation, and the other side is
    round R's adapter. In a copy of the run, round 1's item bias puts ten of the users' validation
    items first, so that round 1 must score above the trained round (24 users' metrics often do not
    move in 2 rounds, and the trained round may hit none of them)."""
    run, _ = run_dir
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "adapters" / "round-001" / "adapter_model.safetensors"
    tensors = load_file(weights)
    catalog, settings = read_run(copy)
    _, valid, _ = leave_last_out(run_users(Path(settings.partition_dir), catalog), catalog, settings.history_len)
    rigged = list(dict.fromkeys(ex.target for ex in valid))[:10]
    bias = torch.zeros_like(tensors["base_model.model.scorer.bias"])
    bias[rigged] = 1e4 - torch.arange(len(rigged), dtype=bias.dtype)  # far above any cosine × scale
    tensors["base_model.model.scorer.bias"] = bias
    save_file(tensors, weights)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    figures = significance([str(copy), "--against", "1", "--resamples", "200"])
    round_1 = significance([str(copy), "--adapter", "1", "--resamples", "200"])
    assert figures["baseline"] == "round 1" and figures["split"] == "validation"
    for k in ("hr@10", "ndcg@10", "recall@20"):
        assert figures[k]["model"] == pytest.approx(last[f"val-{k}"], abs=1e-9), k
        assert figures[k]["baseline"] == pytest.approx(round_1[k]["model"], abs=1e-12), k
    hit = sum(ex.target in rigged for ex in valid) / len(valid)  # every one of them ranks in the top 10
    assert figures["hr@10"]["baseline"] >= hit >= 10 / len(valid)
    assert figures["ndcg@10"]["model"] < figures["ndcg@10"]["baseline"]
