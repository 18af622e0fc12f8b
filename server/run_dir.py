"""The run directory: checkpoints, the metrics rows, and bringing a killed run back.

``run-dir`` (default ``$FEDREC_HOME/runs/run-<run id>``) holds

    config.json          the resolved run config, base-model and catalog SHA-256
    catalog.csv          the public catalog the scores index into
    adapters/round-NNN/  the global adapter after round NNN (000 = initial), PEFT format
    metrics.jsonl        one JSON object per round (machine-readable)
    prior.json           the DP popularity prior: who answered, their ε after it
    ledger.sqlite        the privacy ledger, one transaction per committed round (server/ledger.py)
    summary.json         the last round's figures, written when the run ends

The ledger's commit is each round's commit point: a metrics row or adapter past the ledger's
last round belongs to the round in flight when the server died, and resuming discards it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from flwr.app import ArrayRecord

from common.model import load_adapter_state
from server.ledger import Ledger


SERVER_OPTIMIZER = "server-optimizer.pt"  # server-optimizer = adam: its moments after the round


class RunStopped(RuntimeError):
    """The run cannot go on (e.g. too few clients have privacy budget left); not a crash."""


class RunDirectory:
    def __init__(self, path: Path, model):
        self.path, self.model = path, model
        self.metrics = path / "metrics.jsonl"

    def checkpoint(self, server_round: int, arrays: ArrayRecord, optimizer_state: dict | None = None) -> None:
        """``adapters/round-NNN``: a PEFT adapter folder, written whole or not at all, with the
        server optimizer's state beside the adapter when it has one (``SERVER_OPTIMIZER``)."""
        load_adapter_state(self.model, arrays.to_torch_state_dict())
        target = self.path / "adapters" / f"round-{server_round:03d}"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / SERVER_OPTIMIZER)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    def append_row(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines()] if self.metrics.is_file() else []

    def write_summary(self, nodes: int, stopped: str | None) -> None:
        rows = self.rows()
        summary = {k: v for k, v in rows[-1].items() if k not in ("client-updates", "client-evaluations")} if rows else {}
        summary.update({"rounds": len(rows), "run-dir": str(self.path), "nodes": nodes})
        if stopped:
            summary["stopped"] = stopped
        (self.path / "summary.json").write_text(json.dumps(summary, indent=1))

    def resume_point(self, run_config: dict, checks: dict) -> tuple[int | None, dict]:
        """Bring the directory back to its last committed round; (that round or None, what was discarded).

        Metrics rows and adapters after the ledger's last committed round R are discarded, and
        the run goes on from ``adapters/round-R`` with round R + 1. Clients keep their own
        accountants; releases they made in the lost round are recorded when they next reply.
        """
        config_file = self.path / "config.json"
        if not config_file.is_file() or not (self.path / "ledger.sqlite").is_file():
            raise RunStopped(f"resume: {self.path} has no config.json and ledger.sqlite; is it a fedrec run directory?")
        config = json.loads(config_file.read_text())
        if {k: config.get(k) for k in checks} != checks:
            raise RunStopped(f"resume: the base model or catalog differs from the one {self.path} was trained with")
        stored = config["run-config"]
        differ = sorted(k for k in set(stored) | set(run_config) if k != "resume" and stored.get(k) != run_config.get(k))
        if differ:
            raise RunStopped(f"resume: the run config differs from {config_file} in {', '.join(differ)}; "
                             "a run resumes with its own config")
        ledger = Ledger(self.path / "ledger.sqlite")
        last = ledger.last_round()
        ledger.close()
        lines = self.metrics.read_text().splitlines() if self.metrics.is_file() else []
        kept = [line for line in lines if last is not None and json.loads(line)["round"] <= last]
        tmp = self.metrics.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics)
        discarded = []
        for folder in sorted((self.path / "adapters").glob("round-*")):
            number = folder.name.removeprefix("round-").removesuffix(".tmp")
            if folder.name.endswith(".tmp") or last is None or int(number) > last:
                shutil.rmtree(folder)
                discarded.append(folder.name)
        if last is not None and not (self.path / "adapters" / f"round-{last:03d}").is_dir():
            raise RunStopped(f"resume: the ledger commits round {last} but {self.path}/adapters/round-{last:03d} "
                             "is missing")
        return last, {"discarded-metrics-rows": len(lines) - len(kept), "discarded-adapters": discarded,
                      "elapsed-s": json.loads(kept[-1]).get("elapsed-s", 0.0) if kept else 0.0}
