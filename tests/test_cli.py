"""The fedrec command's errors: one line naming what is wrong, exit code 2, nothing written."""

from __future__ import annotations

import pytest

from simulations.cli import main


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
     "central-delta = 0.2 must be < 1/N = 0.2 for N = 5 clients"),
    (["simulate", "--set", "central-dp=true"], "set popularity-prior=false with central-dp=true"),
])
def test_bad_input_exits_2_with_one_clear_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDREC_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(argv + (["--run-dir", str(tmp_path / "run")] if argv[0] == "simulate" else []))
    assert exit_info.value.code == 2
    out = capsys.readouterr().out
    assert message in out.replace("\n", "")
    assert "Traceback" not in out
    assert not (tmp_path / "run").exists()
