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
           str(run), "--set", "model-layers=2", "lora-layers=1", "max-users=24", "batch-size=8", "history-len=4", "local-steps=3", "dp=false",
           "popularity-prior=false", "server-learning-rate=1.0", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("secagg")
    return simulate(base, "plain"), simulate(base, "secure", "secure-aggregation=true", f"secagg-max-weight={MAX_WEIGHT}")


def adapter(run, round_):
    return load_file(run / "adapters" / f"round-{round_:03d}" / "adapter_model.safetensors")


def test_secagg_global_adapter_equals_fedavg(runs):
    plain, secure = runs
    start, a, s = adapter(plain, 0), adapter(plain, 1), adapter(secure, 1)
    assert set(a) == set(s)
    # Training replays exactly from the seed (tests/test_resume.py shows a resumed run ends with
    # the adapter of an uninterrupted one), so both runs saw the same client updates.
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    diff = max((a[k] - s[k]).abs().max().item() for k in a)
    row = json.loads((secure / "metrics.jsonl").read_text().splitlines()[0])
    bound = quantization_bound([c["num-examples"] for c in row["client-updates"]])
    assert moved > 100 * bound  # training really changed the adapter...
    assert diff <= bound + 1e-7  # ...and SecAgg+ gives FedAvg's average of it, up to quantization
    print(f"SecAgg+ vs FedAvg: max |difference| {diff:.2e}, bound {bound:.2e}; largest change in the round {moved:.2e}")


def test_secagg_run_records_no_individual_update(runs):
    plain, secure = runs
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

