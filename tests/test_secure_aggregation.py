"""SecAgg+ end to end in the real Flower simulation: the same global adapter as plain FedAvg.

Without DP a client's training replays exactly from the run seed, so a plain run and a SecAgg+
run see the same client updates; the global adapters after round 1 must then agree up to the
protocol's quantization. With SecAgg+ the server never holds one client's update, so the ledger
records no update norms.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from common.config import ConfigError, Settings, defaults

MAX_WEIGHT = 2000  # ≥ every client's example count here (726-1,093)


def quantization_bound(num_examples: list[int], clipping_range: float = 8.0, levels: int = 2**22) -> float:
    """Largest per-coordinate error of SecAgg+'s weighted mean: each client rounds n_k/W · θ
    stochastically to a grid of step 2·range/levels (error < one step), and the sum is divided by
    Σ n_k/W."""
    step = 2 * clipping_range / levels
    return len(num_examples) * step / sum(n / MAX_WEIGHT for n in num_examples)


def simulate(base, name, *extra):
    run = base / name
    env = {**os.environ, "FEDREC_HOME": str(base / "home")}
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", "1", "--clients", "3", "--run-dir",
           str(run), "--set", "model-layers=2", "max-users=24", "batch-size=8", "history-len=4", "local-steps=3", "dp=false",
           "popularity-prior=false", "server-learning-rate=1.0", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("secagg")
    return simulate(base, "plain"), simulate(base, "plain-again"), simulate(base, "secure", "secure-aggregation=true",
                                                                         f"secagg-max-weight={MAX_WEIGHT}")


def adapter(run, round_):
    return load_file(run / "adapters" / f"round-{round_:03d}" / "adapter_model.safetensors")


def test_secagg_global_adapter_equals_fedavg(runs):
    plain, again, secure = runs
    start, a, b, s = adapter(plain, 0), adapter(plain, 1), adapter(again, 1), adapter(secure, 1)
    assert set(a) == set(s)
    # The plain run replays: the updates are the same in every run (up to the order in which
    # the server happens to sum the three replies, a float rounding of ~1e-8).
    replay = max((a[k] - b[k]).abs().max().item() for k in a)
    assert replay <= 1e-6
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    diff = max((a[k] - s[k]).abs().max().item() for k in a)
    row = json.loads((secure / "metrics.jsonl").read_text().splitlines()[0])
    bound = quantization_bound([c["num-examples"] for c in row["client-updates"]])
    assert moved > 100 * bound  # training really changed the adapter...
    assert diff <= bound + 1e-7  # ...and SecAgg+ gives FedAvg's average of it, up to quantization
    print(f"SecAgg+ vs FedAvg: max |difference| {diff:.2e}, bound {bound:.2e} (plain vs plain {replay:.2e}); "
          f"largest change in the round {moved:.2e}")


def test_secagg_run_records_no_individual_update(runs):
    plain, _, secure = runs
    rows = [json.loads(line) for line in (secure / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["clients"] == 3 and rows[0]["failures"] == 0
    for run, expect_norms in ((plain, True), (secure, False)):
        with sqlite3.connect(run / "ledger.sqlite") as db:
            norms = [r[0] for r in db.execute("SELECT update_norm FROM participants WHERE phase = 'train'")]
        assert len(norms) == 3
        assert all((n is not None) == expect_norms for n in norms)
    log = (secure / "flower.log").read_text()
    assert "Secure aggregation completed" in log


@pytest.mark.parametrize("overrides,message", [
    ({"secure-aggregation": True, "central-dp": True, "popularity-prior": False},
     "secure-aggregation hides each client's update"),
    ({"secure-aggregation": True, "min-train-nodes": 1}, "secure-aggregation needs min-train-nodes >= 2"),
    ({"secagg-num-shares": 2.5}, "secagg-num-shares must be"),
])
def test_invalid_secagg_combinations_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config({**defaults(), **overrides})


def test_a_budget_decline_under_secagg_is_a_decline_not_a_dropout(tmp_path):
    """A client whose budget cannot pay for the round says so before SecAgg+ starts (query.price):
    recorded as declined, never sampled again, and the others' SecAgg+ round goes on."""
    env = {**os.environ, "FEDREC_HOME": str(tmp_path / "home")}
    settings = ["model-layers=2", "max-users=24", "batch-size=8", "history-len=4", "local-steps=2",
                "popularity-prior=false", "secure-aggregation=true", f"secagg-max-weight={MAX_WEIGHT}"]
    partition = subprocess.run([sys.executable, "-m", "simulations.partition", "--clients", "3", "--set", *settings],
                               env=env, capture_output=True, text=True, timeout=600, check=True)
    budget_file = partition.stdout.strip().splitlines()[-1] + "/client-0/budget.json"
    with open(budget_file) as f:
        budget = json.load(f)
    with open(budget_file, "w") as f:  # site 0 can afford nothing: it declines the first round
        json.dump({**budget, "epsilon-max": 0.01}, f)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--rounds", "2", "--clients", "3",
                           "--run-dir", str(run), "--set", *settings], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["clients"], r["declined"], r["failures"]) for r in rows] == [(2, 1, 0), (2, 0, 0)]
    with sqlite3.connect(run / "ledger.sqlite") as db:
        train = db.execute("SELECT round, status, reason FROM participants WHERE phase = 'train' ORDER BY round").fetchall()
    assert sorted(status for rnd, status, _ in train if rnd == 1) == ["declined", "trained", "trained"]
    assert [status for rnd, status, _ in train if rnd == 2] == ["trained", "trained"]  # never asked again
    assert all(reason.startswith("budget: this round would take ε") for _, status, reason in train
               if status == "declined")
