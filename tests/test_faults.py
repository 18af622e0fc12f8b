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
from server.validation import check_evaluate_reply, check_prior_reply, check_train_reply

METRICS = {"num-examples": 100.3, "epsilon": 1.0, "delta": 1e-5, "steps": 3, "sample-rate": 0.1,
           "noise-multiplier": 1.0, "max-grad-norm": 1.0, "count-noise-multiplier": 20.0, "epsilon-max": 8.0,
           "declined": 0, "client-id": 12345, "history-noise-multiplier": [10.0, 1.0, 20.0],
           "history-sample-rate": [1.0, 0.1, 1.0], "history-steps": [1, 3, 1]}


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
    ({k: v for k, v in METRICS.items() if k != "max-grad-norm"}, None, "metric 'max-grad-norm' missing"),
    ({**METRICS, "steps": 2.5}, None, "metric 'steps' must be an integer"),
    ({**METRICS, "num-examples": float("nan")}, None, "metric 'num-examples' is nan"),
    ({**METRICS, "num-examples": 0.5}, None, "num-examples is 0.5"),
    ({**METRICS, "train-loss": 5.0}, None, "undeclared field(s) ['metrics.train-loss']"),
    ({**METRICS, "user-text-length": 12}, None, "undeclared field(s) ['metrics.user-text-length']"),
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
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--clients", str(clients), "--rounds", "1",
           "--run-dir", str(tmp_path / "run"), "--scenario", *scenario, "--set", "model-layers=2", "lora-layers=1", "max-users=40", "batch-size=8",
           "local-steps=2", *settings]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


def test_faulty_clients_are_dropped_with_their_reasons_and_the_round_completes(tmp_path):
    proc = simulate(tmp_path, 8, ["0:raise", "1:sleep", "2:nan", "3:shape", "4:extra", "5:huge", "6:prior-nan"],
                    "round-timeout=40", sleep=45)  # the sleeper misses the timeout, and is back soon after
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert (row["clients"], row["failures"], row["rejected"]) == (2, 2, 4)
    reasons = sorted(c.get("error") or c.get("rejected") or "trained" for c in row["client-updates"])
    expected = ["scenario: this client crashes", "no reply within round-timeout = 40 s", "non-finite value",
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
    # Partition 6's histogram (NaN) was dropped with its reason; the prior is the other seven's.
    prior = json.loads((run / "prior.json").read_text())
    assert prior["answered"] == 7 and len(prior["rejected"]) == 1
    assert "counts: 1 non-finite value(s)" in prior["rejected"][0]["rejected"]
    with sqlite3.connect(run / "ledger.sqlite") as db:
        assert sorted(r[0] for r in db.execute("SELECT status FROM participants WHERE phase = 'prior'")) == \
            ["answered"] * 7 + ["rejected"]
    assert all(torch.isfinite(t).all() for t in before.values())


def test_too_few_usable_replies_stop_the_run_cleanly(tmp_path):
    proc = simulate(tmp_path, 3, ["0:raise", "1:nan"], "min-replies=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "round 1: 1 usable reply, fewer than min-replies = 2" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "non-finite" in summary["stopped"] and "crashes" in summary["stopped"]
    assert not (tmp_path / "run" / "adapters" / "round-001").exists()  # round 0's adapter stands


PRIOR_METRICS = {"epsilon": 0.5, "delta": 1e-5, "noise-multiplier": 10.0, "sample-rate": 1.0, "steps": 1,
                 "epsilon-max": 8.0, "declined": 0, "client-id": 7, "history-noise-multiplier": [10.0],
                 "history-sample-rate": [1.0], "history-steps": [1], "num-examples": 1.0}


@pytest.mark.parametrize("counts,reason", [
    (torch.full((5,), float("nan")), "counts: 5 non-finite value(s)"),
    (torch.zeros(4), "counts: shape (4,), expected (5,)"),
    (torch.tensor([0.0, 1e9, 0.0, 0.0, 0.0]), "outside [-101, 1e+07]"),
    (torch.tensor([0.0, -500.0, 0.0, 0.0, 0.0]), "outside [-101, 1e+07]"),
    (torch.zeros(5, dtype=torch.int64), "expected a float type"),
])
def test_bad_histograms_are_refused(counts, reason):
    good = RecordDict({"arrays": ArrayRecord({"counts": torch.randn(5) * 10}), "metrics": MetricRecord(PRIOR_METRICS)})
    assert check_prior_reply(good, 5, 10.0) is None
    found = check_prior_reply(RecordDict({"arrays": ArrayRecord({"counts": counts}),
                                          "metrics": MetricRecord(PRIOR_METRICS)}), 5, 10.0)
    assert found is not None and reason in found, found


def test_evaluation_replies_are_bounded_and_answer_the_splits_asked_for():
    both = ["val", "test"]
    sums = {f"{p}{k}": 3.0 for p in ("", "val-") for k in ("sum-hr@10", "sum-ndcg@10", "sum-recall@20", "count")}
    metrics = {**{k: v for k, v in PRIOR_METRICS.items() if k not in ("sample-rate", "steps", "num-examples")}, **sums}
    assert check_evaluate_reply(RecordDict({"metrics": MetricRecord(metrics)}), 56.0, both) is None
    exact = {**metrics, **{f"exact-{p}{k}": 0.5 for p in ("", "val-") for k in ("hr@10", "ndcg@10", "recall@20")},
             "exact-count": 3.0, "exact-val-count": 3.0}
    assert check_evaluate_reply(RecordDict({"metrics": MetricRecord(exact)}), 56.0, both) is None
    validation_only = {k: v for k, v in metrics.items() if k not in sums or k.startswith("val-")}
    assert check_evaluate_reply(RecordDict({"metrics": MetricRecord(validation_only)}), 56.0, ["val"]) is None
    for bad, splits, reason in [
            ({**exact, "exact-hr@10": 1.5}, both, "outside [0, 1]"), ({**metrics, "sum-hr@10": 1e12}, both, "outside"),
            ({**metrics, "count": float("inf")}, both, "is inf"), ({**metrics, "loss": 1.0}, both, "undeclared"),
            (metrics, ["val"], "splits answered"), (validation_only, both, "splits answered"),
            ({k: v for k, v in metrics.items() if k != "sum-hr@10"}, both, "['sum-hr@10'] missing")]:
        found = check_evaluate_reply(RecordDict({"metrics": MetricRecord(bad)}), 56.0, splits)
        assert found is not None and reason in found, (bad, found)


def test_a_malformed_decline_is_not_taken_as_one():
    from server.replies import is_decline

    undeclared = ("noise-multiplier", "sample-rate", "steps", "num-examples")  # a decline does not carry these
    decline = RecordDict({"metrics": MetricRecord({k: v for k, v in PRIOR_METRICS.items() if k not in undeclared}),
                          "decline": ConfigRecord({"reason": "budget: over epsilon-max"})})
    from flwr.app import Message
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    assert is_decline(Message(decline, dst_node_id=1, message_type="train"))
    decline["metrics"]["user-count"] = 12  # a field the release list does not name
    assert not is_decline(Message(decline, dst_node_id=1, message_type="train"))
