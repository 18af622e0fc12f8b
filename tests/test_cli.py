"""The fedrec command's errors: one line naming what is wrong, exit code 2, nothing written."""

from __future__ import annotations

import pytest

from common.cli import main


def fedrec_lines(err: str) -> list[str]:
    """fedrec's own lines on stderr (libraries may warn there too)."""
    return [line for line in err.splitlines() if line.startswith("fedrec:")]


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--set", "noise-multiplier=lots"], "noise-multiplier must be float"),
    (["simulate", "--set", "no-such-key=1"], "unknown key(s) no-such-key"),
    (["simulate", "--set", "partition=user", "max-users=5", "--clients", "3"], "one client per user"),
    (["simulate", "--set", "dataset=/nonexistent/ml-100k"], "not a MovieLens-100K folder"),
    (["recommend", "/nonexistent/run", "--items", "1"], "no config.json"),
    (["recommend", "/nonexistent/run"], "exactly one of --items or --history"),
    (["audit", "/nonexistent/run"], "no ledger in this run directory"),
    (["simulate", "--set", "client-epsilon-max=0"], "client-epsilon-max must be > 0"),
    (["simulate", "--clients", "5", "--set", "central-dp=true", "popularity-prior=false", "central-delta=0.2"],
     "central-delta = 0.2 must be < 1/N = 0.2 for N = central-population = 5 clients"),
    (["simulate", "--clients", "5", "--set", "central-dp=true", "popularity-prior=false", "central-population=4"],
     "5 clients are connected, more than central-population = 4"),
    (["simulate", "--set", "central-dp=true"],
     "set dp = false (the central guarantee alone) or popularity-prior = false"),
    (["simulate", "--clients", "5", "--set", "partition=user", "max-users=5"],
     "Protect each person at the server instead, where one client is one user: dp = false central-dp = true"),
    (["simulate", "--set", "model=/nonexistent/encoder"], "'/nonexistent/encoder' is neither 'all-MiniLM-L6-v2' nor"),
    (["simulate", "--set", "model-layers=-1"], "model-layers must be >= 0"),
    (["simulate", "--set", "model-layers=7"], "model-layers: 7 is not in 1..6"),
    (["simulate", "--set", "model-layers=2", "lora-layers=3"], "lora-layers: 3 is not in 1..2"),
    (["simulate", "--set", "lora-layers=-1"], "lora-layers must be >= 0"),
    (["simulate", "--set", "lora-targets=query,qkv"],
     "lora-targets: qkv names no linear layer of all-MiniLM-L6-v2 (its linear layers: dense, key, query, value)"),
    (["simulate", "--set", "lora-targets= , "], "lora-targets: empty"),
    (["simulate", "--set", "catalog=/nonexistent/catalog.csv"], "/nonexistent/catalog.csv: file not found"),
    (["simulate", "--set", "batch-size"], "--set 'batch-size': expected key=value"),
    (["simulate", "--set", "dp=yes"], "dp must be true or false, got 'yes'"),
    (["simulate", "--rounds", "0"], "num-server-rounds must be >= 1"),
    (["simulate", "--clients", "0"], "--clients 0: need at least 1"),
    (["simulate", "--set", "aggregation=mean"], "aggregation must be one of fedavg, median, trimmed-mean, multi-krum"),
    (["simulate", "--set", "trim-fraction=0.5"], "trim-fraction must be in [0, 0.5)"),
    (["simulate", "--set", "round-timeout=0"], "round-timeout must be > 0"),
    (["simulate", "--set", "max-update-norm=-1"], "max-update-norm must be > 0"),
    (["simulate", "--set", "secure-aggregation=true", "aggregation=median"], "secure-aggregation hides; use"),
    (["simulate", "--clients", "3", "--scenario", "5:nan"], "--scenario: partitions are 0..2, got 5"),
    (["simulate", "--scenario", "0:explode"], "--scenario '0:explode': expected PARTITION:BEHAVIOUR"),
    (["client", "validate", "/nonexistent/site"], "/nonexistent/site: not a folder"),
    (["client", "prepare", "/nonexistent/export.csv", "--catalog", "/nonexistent/catalog.csv", "--out", "/tmp/x"],
     "/nonexistent/catalog.csv: file not found"),
    (["credentials", "/tmp/nothing-to-make"], "nothing to make: give --host NAME"),
    (["client", "superexec", "--runtime-api-address", "127.0.0.1:9094"], "or --any-bundle to run every bundle"),
    (["client", "superexec", "--runtime-api-address", "127.0.0.1:9094", "--approvals", "/tmp/a"],
     "give --approvals DIR and --trusted-keys KEYS.yaml"),
    (["client", "superexec", "--runtime-api-address", "127.0.0.1:9094", "--approvals", "/tmp/a",
      "--trusted-keys", "/tmp/k.yaml", "--any-bundle"], "give --approvals DIR and --trusted-keys KEYS.yaml, or"),
    (["client", "superexec", "--runtime-api-address", "127.0.0.1:9094", "--approvals", "/tmp/a",
      "--trusted-keys", "/nonexistent/keys.yaml"], "/nonexistent/keys.yaml: "),
    (["localhost", "/nonexistent/site"], "not a site's data folder (no interactions.csv): /nonexistent/site"),
])
def test_bad_input_exits_2_with_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(argv + (["--run-dir", str(tmp_path / "run")] if argv[0] == "simulate" else []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # problems go to stderr, one line each, never wrapped
    assert len(lines := fedrec_lines(err)) == 1 and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # checked before anything is written:
    assert not (tmp_path / "partitions").exists()  # no simulated site's data either


@pytest.fixture()
def broken_run(tmp_path, movielens):
    """A run directory whose latest adapter is damaged (a truncated download, a full disk)."""
    import json

    from common.config import defaults
    from common.data import write_catalog

    run = tmp_path / "broken-run"
    (run / "adapters" / "round-001").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"run-config": defaults()}))
    write_catalog(movielens[0], run / "catalog.csv")
    (run / "adapters" / "round-001" / "adapter_config.json").write_text("{}")
    (run / "adapters" / "round-001" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    return run


@pytest.mark.parametrize("extra, message", [
    (["--items", "50"], "adapters/round-001: not a readable PEFT adapter for this run's model"),
    (["--items", "50", "--top", "0"], "--top 0: must be between 1 and"),
    (["--items", "50,99999"], "item id(s) not in the catalog: 99999"),
])
def test_damaged_adapter_or_bad_top_is_one_clear_line(broken_run, capsys, extra, message):
    if "adapter" not in message:  # a good adapter, a bad request: give the run a real (initial) adapter
        import shutil

        from common.model import build_model, load_encoder, lora_config

        shutil.rmtree(broken_run / "adapters" / "round-001")
        encoder, _ = load_encoder("all-MiniLM-L6-v2", 2)
        build_model(encoder, 1682, lora_config(8, 16.0, "query,value")).save_pretrained(
            broken_run / "adapters" / "round-001")
    with pytest.raises(SystemExit) as exit_info:
        main(["recommend", str(broken_run), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(lines := fedrec_lines(err)) == 1 and message in lines[0] and "Traceback" not in err


@pytest.fixture()
def finished_run(tmp_path):
    """A simulation's run directory whose ledger commits all its rounds."""
    import json

    from server.ledger import Ledger

    run = tmp_path / "finished"
    run.mkdir()
    (run / "simulation.json").write_text(json.dumps({"clients": 3, "scenario": [],
                                                     "overrides": {"num-server-rounds": 2, "run-dir": str(run)}}))
    ledger = Ledger(run / "ledger.sqlite")
    for r in (1, 2):
        ledger.commit_round(r, [], [], {})
    ledger.close()
    return run


def half_run(tmp_path, finished_run, adapter: bytes | None):
    """The finished run's plan with 3 rounds, 2 committed, and round 2's adapter as given."""
    import json

    run = tmp_path / "half"
    run.mkdir()
    (run / "ledger.sqlite").write_bytes((finished_run / "ledger.sqlite").read_bytes())
    (run / "simulation.json").write_text(json.dumps({"clients": 3, "scenario": [],
                                                     "overrides": {"num-server-rounds": 3, "run-dir": str(run)}}))
    if adapter is not None:
        (run / "adapters" / "round-002").mkdir(parents=True)
        (run / "adapters" / "round-002" / "adapter_model.safetensors").write_bytes(adapter)
    return run


@pytest.mark.parametrize("argv, message", [
    (["--resume", "{empty}"], "empty: no simulation.json; only runs started by `fedrec simulate` resume this way"),
    (["--resume", "{finished}", "--rounds", "3"], "--resume takes no --rounds, --clients, --set, --run-dir"),
    (["--resume", "{finished}"], "all 2 rounds are committed; nothing to resume"),
    (["--resume", "{garbled}"], "simulation.json: not a fedrec simulation plan"),
    (["--resume", "{no_adapter}"], "round-002/adapter_model.safetensors: the adapter of the last committed round is "
                                   "not readable"),
    (["--resume", "{bad_adapter}"], "the adapter of the last committed round is not readable (SafetensorError"),
    (["--resume", "{bad_ledger}"], "ledger.sqlite: not a readable ledger (file is not a database)"),
])
def test_resume_refuses_what_it_cannot_resume(argv, message, finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    (tmp_path / "empty").mkdir()
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "ledger.sqlite").write_bytes((finished_run / "ledger.sqlite").read_bytes())
    (garbled / "simulation.json").write_text("{\"clients\": 3")
    runs = {"empty": tmp_path / "empty", "finished": finished_run, "garbled": garbled}
    if "{no_adapter}" in argv:
        runs["no_adapter"] = half_run(tmp_path, finished_run, None)
    if "{bad_adapter}" in argv:
        runs["bad_adapter"] = half_run(tmp_path, finished_run, b"\x00" * 10)
    if "{bad_ledger}" in argv:
        runs["bad_ledger"] = half_run(tmp_path, finished_run, None)
        (runs["bad_ledger"] / "ledger.sqlite").write_bytes(b"not a database" * 100)
    argv = [a.format(**runs) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(lines := fedrec_lines(err)) == 1 and message in lines[0] and "Traceback" not in err


def test_only_a_local_command_starts_a_new_accountant_and_it_is_logged(tmp_path):
    """`fedrec client reset-accountant`: the old accountant is kept and the reset logged with its ε."""
    import json

    from common.privacy import load_history, save_history

    state = tmp_path / "state"
    save_history(state, [(1.0, 0.01, 40), (50.0, 1.0, 1)], "prv", 1e-5, "example")
    assert main(["client", "reset-accountant", str(state), "--reason", "new data export, DPO approved"]) == 0
    assert load_history(state) == []
    (retired,) = state.glob("accountant-retired-*.json")
    assert json.loads(retired.read_text())["history"] == [[1.0, 0.01, 40], [50.0, 1.0, 1]]
    (entry,) = [json.loads(line) for line in (state / "accountant-log.jsonl").read_text().splitlines()]
    assert entry["reason"] == "new data export, DPO approved" and entry["retired-epsilon"] > 0
    assert entry["retired"] == str(retired)


def test_a_site_audit_covers_its_lifetime_across_a_new_accountant(tmp_path, capsys):
    """`fedrec client audit`: the releases under a retired accountant stay in the site's view
    (with the ε they cost then), beside the current accountant's, which is checked in full."""
    import json

    from common.privacy import save_history

    site = tmp_path / "site"
    state = site / "state"

    def release(run: str, sigma: float, history: list) -> list:
        history = history + [(sigma, 1.0, 1)]
        save_history(state, history, "prv", 1e-5, "example", [
            {"run": run, "flower-run": 1, "round": 0, "phase": "prior", "mechanism": "gaussian-histogram",
             "noise_multiplier": sigma, "sample_rate": 1.0, "steps": 1, "sensitivity": 1.0}])
        return history

    release("run-b", 3.0, release("run-a", 5.0, []))
    assert main(["client", "reset-accountant", str(state), "--reason", "new data export"]) == 0
    release("run-c", 4.0, [])
    capsys.readouterr()
    assert main(["client", "audit", str(site), "--json", str(tmp_path / "site.json")]) == 0
    report = json.loads((tmp_path / "site.json").read_text())
    assert [r["run"] for r in report["retired-releases"]] == ["run-a", "run-b"]
    assert [r["run"] for r in report["releases"]] == ["run-c"] and report["ok"]
    assert report["retired"][0]["reason"] == "new data export"
    assert "under a retired accountant: run-b" in " ".join(capsys.readouterr().out.split())
