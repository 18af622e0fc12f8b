"""Client faults and update validation: bad replies are dropped with a reason, rounds go on.

The simulations run the real ClientApp; ``simulations/scenarios.py`` only alters what the
listed partitions send (or makes them crash or hang).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.torch import load_file

from common.model import adapter_state
from server.validation import check_train_reply

METRICS = {"num-examples": 100, "train-loss": 5.0, "epsilon": 1.0, "delta": 1e-5, "steps": 3, "sample-rate": 0.1,
           "noise-multiplier": 1.0, "max-grad-norm": 1.0, "epsilon-max": 8.0, "declined": 0, "client-id": 12345,
           "history-noise-multiplier": [10.0, 1.0], "history-sample-rate": [1.0, 0.1], "history-steps": [1, 3]}


def reply(arrays: dict, metrics: dict = METRICS, extra: dict | None = None) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics), **(extra or {})})


def corrupt(state, how):
    s = {k: v.clone() for k, v in state.items()}
    first = next(iter(s))
    if how == "nan":
        s[first].view(-1)[3] = float("nan")
    elif how == "inf":
        s[first].view(-1)[0] = float("inf")
    elif how == "shape":
        s[first] = s[first][:-1]
    elif how == "dtype":
        s[first] = s[first].double()
    elif how == "missing":
        s.pop(first)
    elif how == "extra":
        s["base_model.model.extra.weight"] = torch.zeros(2)
    elif how == "norm":
        s[first] = s[first] + 1000.0
    return s


@pytest.mark.parametrize("how,reason", [
    ("nan", "1 non-finite value(s)"), ("inf", "1 non-finite value(s)"), ("shape", "expected (8, 384)"),
    ("dtype", "dtype torch.float64, expected torch.float32"), ("missing", "9 received, 10 expected; missing"),
    ("extra", "11 received, 10 expected; unexpected"), ("norm", "exceeds max-update-norm 100"),
])
def test_corrupted_adapters_are_refused(model_and_tokenizer, how, reason):
    model, _ = model_and_tokenizer
    sent = adapter_state(model)
    assert check_train_reply(reply(sent), sent, 100.0) is None  # the honest reply passes
    found = check_train_reply(reply(corrupt(sent, how)), sent, 100.0)
    assert found is not None and reason in found, found


@pytest.mark.parametrize("metrics,extra,reason", [
    ({k: v for k, v in METRICS.items() if k != "train-loss"}, None, "metric 'train-loss' missing"),
    ({**METRICS, "num-examples": 2.5}, None, "metric 'num-examples' must be an integer"),
    ({**METRICS, "train-loss": float("nan")}, None, "metric 'train-loss' is nan"),
    ({**METRICS, "num-examples": 0}, None, "num-examples is 0"),
    ({**METRICS, "user-text-length": 12}, None, "undeclared metric(s) ['user-text-length']"),
    ({**METRICS, "history-steps": [1.5, 3.0]}, None, "metric 'history-steps' must be a list of finite ints"),
    ({**METRICS, "history-steps": [3]}, None, "the accountant history lists differ in length"),
    (METRICS, {"leak": ConfigRecord({"text": "hello"})}, "unexpected records"),
])
def test_undeclared_or_mistyped_metrics_are_refused(model_and_tokenizer, metrics, extra, reason):
    model, _ = model_and_tokenizer
    sent = adapter_state(model)
    found = check_train_reply(reply(sent, metrics, extra), sent, 100.0)
    assert found is not None and reason in found, found


def simulate(tmp_path, clients, scenario, *settings, sleep=0):
    env = {**os.environ, "FEDREC_HOME": str(tmp_path / "home"), "FEDREC_SCENARIO_SLEEP": str(sleep)}
    cmd = [sys.executable, "-m", "simulations.cli", "simulate", "--clients", str(clients), "--rounds", "1",
           "--run-dir", str(tmp_path / "run"), "--scenario", *scenario, "--set", "model-layers=2", "max-users=40", "batch-size=8",
           "local-steps=2", *settings]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


def test_faulty_clients_are_dropped_with_their_reasons_and_the_round_completes(tmp_path):
    proc = simulate(tmp_path, 8, ["0:raise", "1:sleep", "2:nan", "3:shape", "4:extra", "5:huge"],
                    "round-timeout=100", sleep=130)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (row["clients"], row["failures"], row["rejected"]) == (2, 2, 4)
    reasons = sorted(c.get("error") or c.get("rejected") or "trained" for c in row["client-updates"])
    expected = ["scenario: this client crashes", "no reply within round-timeout = 100 s", "non-finite value",
                "shape (7, 384), expected (8, 384)", "unexpected ['base_model.model.extra.weight']",
                "exceeds max-update-norm 100"]
    for fragment in expected:
        assert sum(fragment in r for r in reasons) == 1, (fragment, reasons)
    assert reasons.count("trained") == 2
    # The ledger keeps every failure with its reason; nothing bad reached the global adapter.
    with sqlite3.connect(run / "ledger.sqlite") as db:
        statuses = sorted(r[0] for r in db.execute("SELECT status FROM participants WHERE phase = 'train'"))
    assert statuses == ["failed"] * 2 + ["rejected"] * 4 + ["trained"] * 2
    before, after = (load_file(run / "adapters" / f"round-00{r}" / "adapter_model.safetensors") for r in (0, 1))
    assert set(before) == set(after) and all(torch.isfinite(t).all() for t in after.values())
    change = sum(float(((after[k] - before[k]) ** 2).sum()) for k in before) ** 0.5
    assert 0 < change <= 100.0  # the huge update (norm ~5,000) was not averaged in


def test_too_few_usable_replies_stop_the_run_cleanly(tmp_path):
    proc = simulate(tmp_path, 3, ["0:raise", "1:nan"], "min-replies=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "round 1: 1 usable reply, fewer than min-replies = 2" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "non-finite" in summary["stopped"] and "crashes" in summary["stopped"]
    assert not (tmp_path / "run" / "adapters" / "round-001").exists()  # round 0's adapter stands
