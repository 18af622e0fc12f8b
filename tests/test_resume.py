"""Resume after kill -9: a real simulation's server process is killed mid-round and resumed.

The process that hosts the ServerApp (``fedrec simulate``) gets SIGKILL, then Ray and its
workers (what is left when the machine dies); ``fedrec simulate --resume RUN_DIR`` carries on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

from safetensors.torch import load_file

from common.config import Settings, defaults
from common.privacy import epsilon, load_history
from server.ledger import pseudonym
from simulations.bench_resume import SMALL as BENCH_SMALL, metrics_rows, resume_cmd, run_until, simulate_cmd
from deployment.localhost import LocalDeployment
from simulations.partition import materialize

CLIENTS, ROUNDS = 3, 2  # killed in round 2, the last: the resumed run finishes it
SMALL = BENCH_SMALL + ["lora-layers=1"]  # LoRA on the top layer only: the frozen lower layer's states are cached


def ledger_rows(run: Path, query: str) -> list:
    db = sqlite3.connect(f"file:{run / 'ledger.sqlite'}?mode=ro", uri=True)
    rows = db.execute(query).fetchall()
    db.close()
    return rows


def resume(run: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(resume_cmd(run), env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_committed_rounds(run: Path, first_ledger_round: int) -> list[dict]:
    """Every round once: in metrics.jsonl, the ledger and adapters/, and nothing after the last."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    assert [r for (r,) in ledger_rows(run, "SELECT round FROM rounds ORDER BY round")] == \
        list(range(first_ledger_round, ROUNDS + 1))
    assert sorted(p.name for p in (run / "adapters").iterdir()) == [f"round-{r:03d}" for r in range(ROUNDS + 1)]
    elapsed = [r["elapsed-s"] for r in rows]
    assert elapsed == sorted(elapsed)  # the resumed run's clock carries on from the last committed row
    return rows


def test_killed_mid_round_resumes_with_the_same_ledger_accountants_and_audit(tmp_path, fedrec_here):
    """DP on: the kill lands after some clients trained in round 2 (their accountants recorded the
    release) but before the server committed it. The resumed run records those releases, so the
    audit recomputes every ε the clients report, and each client's accountant equals the ledger."""
    home, run = tmp_path / "home", tmp_path / "run"
    env = {**os.environ, "FEDREC_HOME": str(home)}

    def accountants() -> list[Path]:
        return sorted(home.glob("partitions/*/client-*/state/run/accountant.json"))

    def round_two_trained_not_committed() -> bool:
        # Prior + round 1 (DP-SGD, count, evaluation) = 4 releases; 6 once round 2's DP-SGD and
        # count are spent, not yet committed.
        return metrics_rows(run) == 1 and any(len(load_history(a.parent)) == 6 for a in accountants())

    killed, _ = run_until(simulate_cmd(run, CLIENTS, ROUNDS, SMALL + ["client-epsilon-max=1000"]), env,
                          round_two_trained_not_committed)
    assert killed.returncode == -9
    assert metrics_rows(run) == 1 and ledger_rows(run, "SELECT MAX(round) FROM rounds") == [(1,)]

    proc = resume(run, env)
    assert "resuming" in proc.stdout
    rows = check_committed_rounds(run, first_ledger_round=0)
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert [r["from-round"] for r in resumes] == [1]

    # Releases the dead server received but never committed are in the ledger now, as unrecorded.
    unrecorded = ledger_rows(run, "SELECT round, node, steps FROM mechanisms WHERE phase = 'unrecorded'")
    assert unrecorded and all(r == 2 for r, _, _ in unrecorded)
    # Each client's own accountant (its state directory) equals what the ledger holds for it,
    # in order, and the ε it last reported is that accountant's.
    key = json.loads(ledger_rows(run, "SELECT value FROM meta WHERE key = 'pseudonym-key'")[0][0])
    lengths = []
    for path in accountants():
        history = load_history(path.parent)
        node = pseudonym(key, int((path.parent / "client-id").read_text()))
        recorded = ledger_rows(run, "SELECT noise_multiplier, sample_rate, steps FROM mechanisms WHERE node = "
                                    f"'{node}' ORDER BY round, rowid")
        assert [tuple(h) for h in history] == recorded, node
        reported = ledger_rows(run, f"SELECT epsilon, delta FROM participants WHERE node = '{node}' AND round = {ROUNDS}"
                                    " AND phase = 'evaluate'")
        assert reported and abs(reported[0][0] - epsilon(history, reported[0][1])) < 1e-9
        lengths.append(len(history))
    assert len(lengths) == CLIENTS
    # prior + 2 rounds × 3 releases, plus the lost round-2 DP-SGD and count for those that trained in it.
    assert sorted(set(lengths)) <= [7, 9] and 2 * lengths.count(9) == len(unrecorded)
    assert rows[-1]["epsilon-max"] > rows[0]["epsilon-max"]

    audit = fedrec_here("audit", run)
    assert audit.returncode == 0, audit.stdout[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert report["findings"] == []


def test_resumed_run_ends_with_the_adapter_of_an_uninterrupted_one(tmp_path):
    """Without DP, training replays exactly from the seed: a run killed in round 2 and resumed
    ends with the global adapter an uninterrupted run ends with."""
    env = {**os.environ, "FEDREC_HOME": str(tmp_path / "home")}
    settings = SMALL + ["dp=false", "popularity-prior=false"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    done = subprocess.run(simulate_cmd(straight, CLIENTS, ROUNDS, settings), env=env, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Killed once round 2's adapter exists but before its metrics row: the round in flight.
    run_until(simulate_cmd(run, CLIENTS, ROUNDS, settings), env,
              lambda: (run / "adapters" / "round-002").is_dir() and metrics_rows(run) == 1)
    resume(run, env)
    check_committed_rounds(run, first_ledger_round=1)
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes[0]["discarded-adapters"] == ["round-002"]
    a = load_file(straight / f"adapters/round-{ROUNDS:03d}/adapter_model.safetensors")
    b = load_file(run / f"adapters/round-{ROUNDS:03d}/adapter_model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[k] - load_file(straight / "adapters/round-000/adapter_model.safetensors")[k]).abs().max())
                for k in a)
    assert moved > 1e-3  # the rounds did train
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    ours = [json.loads(line)["val-ndcg@10"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line)["val-ndcg@10"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert max(abs(x - y) for x, y in zip(ours, theirs)) < 1e-6



def test_deployment_resumes_after_the_superlink_and_serverapp_are_killed(tmp_path, app_dir, fedrec_here):
    """Flower's Deployment Engine: SIGKILL the SuperLink and the ServerApp process mid-round 2,
    start the SuperLink again on its database, and resume with ``flwr run --run-config
    'run-dir=… resume=true'``: the SuperNodes reconnect, the run completes every round once, and
    the audit recomputes every ε the sites report."""
    s = Settings.from_run_config({**defaults(), "max-users": 30, "partition-dir": str(tmp_path / "data")})
    materialize(s, 2)
    sites = [tmp_path / "data" / f"client-{k}" for k in range(2)]
    run = tmp_path / "run"
    overrides = {"model-layers": 2, "lora-layers": 1, "num-server-rounds": ROUNDS, "local-steps": 2, "batch-size": 8, "max-users": 30,
                 "run-dir": str(run)}
    with LocalDeployment(tmp_path, sites) as d:
        d.wait_for_nodes(2)
        config = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        d.flwr("run", str(app_dir), "onprem", "--run-config", config)  # submits and returns: the run goes on
        deadline = time.time() + 1200
        # Mid-round 2: round 1 committed, and a site has spent round 2's DP-SGD step.
        while not (metrics_rows(run) == 1 and any(len(load_history(site / "state")) == 6 for site in sites)):
            assert time.time() < deadline, d.log("superlink")[-3000:]
            time.sleep(0.1)
        d.crash_superlink()
        assert metrics_rows(run) == 1
        d.wait_for_nodes(2)
        d.run({**overrides, "resume": True}, timeout=1800, app=str(app_dir))
    check_committed_rounds(run, first_ledger_round=0)
    assert [json.loads(line)["from-round"] for line in (run / "resumes.jsonl").read_text().splitlines()] == [1]
    assert ledger_rows(run, "SELECT COUNT(*) FROM mechanisms WHERE phase = 'unrecorded'")[0][0] >= 1
    audit = fedrec_here("audit", run)
    assert audit.returncode == 0, audit.stdout[-3000:]
    assert json.loads((run / "report.json").read_text())["findings"] == []
