"""`fedrec client audit DATA_DIR`: a site's own audit, from its own records only.

A site (its data-protection officer) sees everything its node released over its lifetime: to
which run and round, by which mechanism (σ, q, steps, L2 sensitivity), and what ε each cost. It
reads only the site's own files: the accountant (``state/accountant.json``), the release log
(``state/releases.jsonl``, one line per release, written by the node as it releases; the
last release's lines are also in the accountant, written with its charge), earlier
accountants the site retired (``accountant-log.jsonl``) and the budget (``budget.json``).

It is the auditor's code, not the node's, and shares none of the node's accountant: ε is
recomputed with dp-accounting (``audit/accountant.py``). Findings:

* **log and accountant disagree**: a charged release the log does not describe, a logged one
  the accountant did not charge, or different (σ, q, steps);
* **ε mismatch**: an ε the node recorded further from the auditor's than the accountants'
  stated error;
* **over budget**: the recomputed ε above the site's ``epsilon-max``;
* with ``--ledger RUN_DIR`` (a run's ``ledger.sqlite``, which the server operator shares):
  **ledger differs**, a release or a reported ε of this site in the ledger that is not in the
  site's log as it is there. The site finds itself in the ledger by the ledger's pseudonym of
  its own ``client-id``. Releases the site made to the run that the ledger does not hold (a reply
  lost in a crash) are listed, not findings: the ledger records them with the next reply.

Exit code 1 when there is any finding.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from pathlib import Path

from audit.accountant import audit_epsilon, tolerance

MECHANISM_KEYS = ("mechanism", "noise_multiplier", "sample_rate", "steps")


def pseudonym(key: str, client: int | str) -> str:
    """The ledger's name for a client (server/ledger.py writes it; tests/test_layout.py checks they agree)."""
    return "node-" + hashlib.sha256(f"{key}:{client}".encode()).hexdigest()[:12]


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not a JSON object ({e.msg})") from None
    return rows


def site_records(state_dir: Path) -> dict:
    """The site's own files: its accountant, release log, retired accountants."""
    path = state_dir / "accountant.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no accountant: this site has released nothing, or the state folder is "
                                "elsewhere (--state-dir; a simulated site's is DATA_DIR/state/RUN_NAME)")
    accountant = json.loads(path.read_text())
    client_id = (state_dir / "client-id").read_text().strip() if (state_dir / "client-id").is_file() else None
    log = read_jsonl(state_dir / "releases.jsonl")
    # The node stores its last releases' lines in the accountant with the charge, then appends
    # them to the log; a crash between the two leaves them in the accountant alone.
    logged = {r["index"] for r in log}
    log += [r for r in accountant.get("last-releases", []) if r["index"] not in logged]
    return {"accountant": accountant, "log": log,
            "retired": [r for r in read_jsonl(state_dir / "accountant-log.jsonl") if r.get("retired")],
            "retired-releases": [r for log in sorted(state_dir.glob("releases-retired-*.jsonl"))
                                 for r in read_jsonl(log)],
            "client-id": client_id}


def check_log(accountant: dict, log: list[dict]) -> list[dict]:
    """Findings where the release log and the accountant's history disagree, index by index."""
    history = [tuple(h) for h in accountant["history"]]
    logged = {r["index"]: r for r in log}
    findings = []
    for index, (sigma, q, steps) in enumerate(history):
        r = logged.get(index)
        if r is None:
            findings.append({"kind": "unlogged", "index": index, "charged": [sigma, q, steps]})
        elif (r["noise_multiplier"], r["sample_rate"], r["steps"]) != (sigma, q, steps):
            findings.append({"kind": "log-differs", "index": index, "charged": [sigma, q, steps],
                             "logged": [r["noise_multiplier"], r["sample_rate"], r["steps"]]})
    findings += [{"kind": "not-charged", "index": i, "logged": logged[i]} for i in sorted(logged) if i >= len(history)]
    return findings


def check_epsilons(accountant: dict, log: list[dict]) -> tuple[list[dict], list[float]]:
    """The auditor's ε after every release, and findings where the node's own figures differ."""
    history = tuple(tuple(h) for h in accountant["history"])
    delta, kind = accountant["delta"], accountant["accountant"]
    after = [audit_epsilon(history[:i + 1], delta, kind) for i in range(len(history))]
    checks = {(r["covers"], r["epsilon-after"]) for r in log if 0 < r["covers"] <= len(history)}
    if history:
        checks.add((len(history), accountant["epsilon"]))
    findings = [{"kind": "mismatch", "releases": covers, "recorded": recorded, "recomputed": after[covers - 1]}
                for covers, recorded in sorted(checks)
                if abs(recorded - after[covers - 1]) > tolerance(kind, after[covers - 1])]
    return findings, after


def check_ledger(run_dir: Path, client_id: str | None, log: list[dict]) -> tuple[str | None, list[dict], list[dict]]:
    """This site's rows in a run's ledger against its own log: (its ledger name, findings, notes)."""
    path = Path(run_dir) / "ledger.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger in this run directory")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    key = json.loads(db.execute("SELECT value FROM meta WHERE key = 'pseudonym-key'").fetchone()[0])
    name = pseudonym(key, client_id) if client_id is not None else None
    mechanisms = [dict(r) for r in db.execute(
        "SELECT * FROM mechanisms WHERE node = ? ORDER BY round, rowid", (name,))]
    participants = [dict(r) for r in db.execute(
        "SELECT * FROM participants WHERE node = ? AND releases IS NOT NULL ORDER BY round, rowid", (name,))]
    db.close()
    if not mechanisms and not participants:
        return None, [{"kind": "not-in-ledger", "run-dir": str(run_dir),
                       "why": "the ledger names no client by this site's client-id"}], []
    by_index = {r["index"]: r for r in log}
    findings, matched = [], set()
    # The ledger holds this site's releases in the order of its accountant history.
    for index, m in enumerate(mechanisms):
        r = by_index.get(index)
        ledger_side = {k: m[k] for k in MECHANISM_KEYS}
        site_side = {k: r[k] for k in MECHANISM_KEYS} if r else None
        if m["phase"] == "unrecorded" and r:  # recorded late, by a generic name: the parameters must agree
            ledger_side.pop("mechanism"), site_side.pop("mechanism")
        if site_side != ledger_side:
            findings.append({"kind": "ledger-differs", "round": m["round"], "phase": m["phase"], "index": index,
                             "ledger": ledger_side, "site": site_side})
        matched.add(index)
    for p in participants:  # every ε the ledger says this site reported is the one it recorded
        if p["releases"] == 0:  # nothing released yet: no ε to compare
            continue
        r = by_index.get(p["releases"] - 1)
        if r is None or r["covers"] != p["releases"] or r["epsilon-after"] != p["epsilon"]:
            findings.append({"kind": "ledger-differs", "round": p["round"], "phase": p["phase"],
                             "ledger-epsilon": p["epsilon"], "site-epsilon": r and r["epsilon-after"]})
    runs = {(by_index[i]["run"], by_index[i]["flower-run"]) for i in matched if i in by_index}
    names, flower_runs = {n for n, _ in runs if n}, {f for _, f in runs}
    notes = [r for r in log if r["index"] not in matched and (r["run"] in names or r["flower-run"] in flower_runs)]
    return name, findings, notes


def quantization_delta(log: list[dict], epsilon: float) -> float | None:
    """What SecAgg+'s rounding of the site's distributed-noise shares adds to δ: (1 + e^ε)·Σ τ over
    those releases (client/secure_aggregation.py ``quantization_slack``); 0 without such releases,
    None if one of them did not record its τ."""
    shared = [r for r in log if "noise-shared-by" in r]
    if any("quantization-slack" not in r for r in shared):
        return None
    total = sum(r["quantization-slack"] for r in shared)
    return 0.0 if total == 0 else total * (1 + math.exp(min(epsilon, 700.0)))


def site_audit(data_dir: Path, state_dir: Path | None = None, ledger: Path | None = None) -> dict:
    state_dir = Path(state_dir) if state_dir else Path(data_dir) / "state"
    records = site_records(state_dir)
    accountant, log = records["accountant"], records["log"]
    findings = check_log(accountant, log)
    mismatches, after = check_epsilons(accountant, log)
    findings += mismatches
    budget_path = Path(data_dir) / "budget.json"
    budget = json.loads(budget_path.read_text()) if budget_path.is_file() else {}
    lifetime = after[-1] if after else 0.0
    if budget.get("epsilon-max") is not None and lifetime > budget["epsilon-max"]:
        findings.append({"kind": "over-budget", "recomputed": lifetime, "epsilon-max": budget["epsilon-max"]})
    report = {"data-dir": str(data_dir), "state-dir": str(state_dir), "unit": accountant.get("unit"),
              "delta": accountant["delta"], "accountant": accountant["accountant"],
              "epsilon-recorded": accountant["epsilon"], "epsilon-recomputed": lifetime,
              "epsilon-max": budget.get("epsilon-max"),
              "releases": [{**r, "epsilon-recomputed": after[r["index"]] if r["index"] < len(after) else None}
                           for r in sorted(log, key=lambda r: r["index"])],
              "retired": records["retired"], "retired-releases": records["retired-releases"], "ledger": None,
              "quantization-delta": quantization_delta(log, lifetime)}
    if ledger is not None:
        name, differ, notes = check_ledger(ledger, records["client-id"], log)
        findings += differ
        report["ledger"] = {"run-dir": str(ledger), "name": name, "not-in-ledger": notes}
    report["findings"] = findings
    report["ok"] = not findings
    return report


def main(data_dir: Path, state_dir: Path | None, ledger: Path | None, json_out: Path | None, console) -> int:
    from rich.table import Table

    report = site_audit(data_dir, state_dir, ledger)
    table = Table(title=f"Everything this site released ({report['state-dir']})")
    for col in ("#", "run", "round", "phase", "mechanism", "σ", "q", "steps", "sensitivity", "ε after (node)",
                "ε after (auditor)"):
        table.add_column(col, justify="right")
    for r in report["releases"]:
        table.add_row(str(r["index"]), r["run"] or f"flower run {r['flower-run']}", str(r["round"]), r["phase"],
                      r["mechanism"], f"{r['noise_multiplier']:g}", f"{r['sample_rate']:.4g}", str(r["steps"]),
                      f"{r['sensitivity']:.4g}", f"{r['epsilon-after']:.4f}",
                      "—" if r["epsilon-recomputed"] is None else f"{r['epsilon-recomputed']:.4f}")
    console.print(table)
    budget = "no limit" if report["epsilon-max"] is None else f"{report['epsilon-max']:g}"
    console.print(f"Lifetime ε = {report['epsilon-recomputed']:.4f} (dp-accounting, recomputed; the node recorded "
                  f"{report['epsilon-recorded']:.4f} with Opacus {report['accountant'].upper()}) at "
                  f"δ = {report['delta']:g}, {report['unit']}; budget ε ≤ {budget}.")
    if any("noise-shared-by" in r for r in report["releases"]):
        extra = report["quantization-delta"]
        console.print("Distributed-noise releases hold under SecAgg+'s trust model, and SecAgg+'s rounding adds "
                      + ("an unknown amount (a release did not record its τ)" if extra is None else f"{extra:.3g}")
                      + " to δ.")
    for r in report["retired"]:
        console.print(f"Retired accountant ({r['reason']}): ε = {r['retired-epsilon']}, δ = {r['retired-delta']} "
                      f"({r['retired']}); it is not composed with the current one.")
    for r in report["retired-releases"]:
        console.print(f"  under a retired accountant: {r['run'] or r['flower-run']} round {r['round']} {r['mechanism']} "
                      f"(σ {r['noise_multiplier']:g}, q {r['sample_rate']:.4g}, {r['steps']} steps), ε after "
                      f"{r['epsilon-after']:.4f} at δ = {r['delta']:g} ({r['accountant'].upper()})")
    if report["ledger"]:
        led = report["ledger"]
        console.print(f"In the ledger of {led['run-dir']} as {led['name']}; "
                      f"{len(led['not-in-ledger'])} release(s) to that run the ledger does not hold.")
    for f in report["findings"]:
        console.print(f"[red]{f['kind']}[/red]: {json.dumps(f)}")
    console.print("[green]No finding.[/green]" if report["ok"] else f"[red]{len(report['findings'])} finding(s).[/red]")
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1
