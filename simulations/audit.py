"""`fedrec audit RUN_DIR`: recompute every ε of a run from its ledger, independently.

For each client, the mechanisms it ran (ledger table ``mechanisms``: σ, q, steps per round)
are replayed, in round order, through Google's ``dp-accounting`` — an implementation that
shares no code with the Opacus accountant the clients used (its RDP accountant for RDP
clients, its PLD accountant for PRV clients). Every ε a client reported is compared with the
recomputed ε of its history up to that round; a relative difference over ``TOLERANCE`` is a
mismatch. Each client's final recomputed ε is checked against the budget it declared.

With central DP on, the server's client-level releases (node ``server``, accountant
``flwr-rdp``: Flower's RdpAccountant, i.e. dp-accounting inside) are recomputed with Opacus'
RDP accountant instead, and reported as their own guarantee, never added to the clients'.

``fedrec audit --empirical RUN_DIR`` adds the one-run canary audit of a simulation planted
with canaries (``simulations/empirical_audit.py``): a measured 95 % lower bound ε_lb beside
the proven ε; ε_lb above the proven ε is a finding.

Writes ``report.json`` (for machines) and ``report.html`` (self-contained, with plots) into
the run directory. Exit code 1 when a mismatch or a budget overrun is found.
"""

from __future__ import annotations

import base64
import html
import io
import json
import sqlite3
from collections import defaultdict
from pathlib import Path

from common.privacy import CLIENT_UNIT, UNIT, epsilon, independent_epsilon
from server.central_dp import ACCOUNTANT as CENTRAL_ACCOUNTANT

TOLERANCE = 0.01  # relative: the two implementations agree far closer for RDP (~1e-9)

TRUST_MODEL = (
    "Each client runs DP-SGD on its own data and keeps its own accountant and budget; the server and "
    "everyone who sees the global adapters are untrusted. The guarantee needs no trust in the server."
)
CENTRAL_TRUST_MODEL = (
    "The server sees each client's update and is trusted to clip it, sample clients by Poisson sampling and add "
    "the noise; everyone who sees only the global adapters (the public, other clients) is covered.")
RELEASED = (
    "Every client's adapter update in every round (the server sees each one; with FedAvg the global "
    "adapter of every round is their weighted mean), and the noisy popularity histograms of round 0."
)
NOT_COVERED = [
    ("The metrics each client sends with its update (loss, example count, evaluation metrics on its "
     "held-out users): they are not privatised."),
    ("The choice of hyper-parameters, and repeated runs over the same data unless they share the "
     "client's state directory."),
    ("Floating-point effects and the PRNG: the noise comes from torch's generator seeded from the OS "
     "entropy pool, not from a cryptographically secure generator."),
    ("Guarantees per user or per rating: the unit is one training example; one rating appears in up "
     "to history-len + 1 examples, so per-user protection follows only by group privacy."),
]


def read_ledger(run_dir: Path) -> dict:
    path = Path(run_dir) / "ledger.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger in this run directory (runs before fedrec 0.2 have none)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    tables = {t: [dict(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY round, rowid")]
              for t in ("rounds", "participants", "mechanisms", "metrics")}
    tables["meta"] = {r["key"]: json.loads(r["value"]) for r in db.execute("SELECT key, value FROM meta")}
    db.close()
    return tables


def audit(run_dir: Path, empirical: bool = False) -> dict:
    """The audit as a dict (what ``report.json`` holds)."""
    ledger = read_ledger(run_dir)
    mechanisms = defaultdict(list)  # node -> [(round, (σ, q, steps), δ, accountant)]
    for m in ledger["mechanisms"]:
        mechanisms[m["node"]].append((m["round"], (m["noise_multiplier"], m["sample_rate"], m["steps"]),
                                      m["delta"], m["accountant"]))
    clients, findings = {}, []
    for p in ledger["participants"]:
        if p["epsilon"] is None:
            continue
        node, rnd = p["node"], p["round"]
        # A trained/answered row reports ε after this round's mechanism; a declined one, before it.
        upto = [x for x in mechanisms[node] if x[0] <= rnd]
        history = [x[1] for x in upto]
        accountant = upto[-1][3] if upto else ledger["meta"].get("accountant", "rdp")
        recomputed = recompute(history, p["delta"], accountant)
        diff = abs(recomputed - p["epsilon"]) / max(abs(recomputed), 1e-12) if recomputed else abs(p["epsilon"])
        c = clients.setdefault(node, {"node": node, "rounds": [], "epsilon-max": p["epsilon_max"],
                                      "delta": p["delta"], "accountant": accountant})
        c["rounds"].append({"round": rnd, "phase": p["phase"], "status": p["status"], "reported": p["epsilon"],
                            "recomputed": recomputed, "relative-difference": diff})
        c["epsilon-max"], c["delta"] = p["epsilon_max"], p["delta"]
        if diff > TOLERANCE:
            findings.append({"kind": "mismatch", "node": node, "round": rnd, "reported": p["epsilon"],
                             "recomputed": recomputed, "relative-difference": diff})
    for node, c in clients.items():
        final = recompute([x[1] for x in mechanisms[node]], c["delta"], c["accountant"])
        c["final-epsilon"] = final
        c["final-reported"] = c["rounds"][-1]["reported"]
        c["steps"] = sum(x[1][2] for x in mechanisms[node] if x[1][1] < 1.0)
        # Over budget: by the client's own accounting, or by the recomputation beyond the
        # tolerance that separates two implementations of the same accountant.
        if c["epsilon-max"] is not None and (c["final-reported"] > c["epsilon-max"]
                                             or final > c["epsilon-max"] * (1 + TOLERANCE)):
            findings.append({"kind": "over-budget", "node": node, "reported": c["final-reported"],
                             "recomputed": final, "epsilon-max": c["epsilon-max"]})
    central = clients.pop("server", None)
    if central:
        central.update({"unit": CLIENT_UNIT, "adjacency": "add/remove all the data of one client",
                        "trust-model": CENTRAL_TRUST_MODEL, "releases": len(mechanisms["server"]),
                        "population": ledger["meta"].get("central-population"),
                        "expected-clients": ledger["meta"].get("central-expected-clients"),
                        "independent-accountant": "Opacus RDP (the server used Flower's RdpAccountant)"})
    measured = None
    if empirical:
        from simulations.empirical_audit import empirical_audit

        finals = [c["final-epsilon"] for c in clients.values()]
        dp = ledger["meta"].get("run-config", {}).get("dp", True)
        delta = max((c["delta"] for c in clients.values()), default=1e-5)
        measured = empirical_audit(Path(run_dir), max(finals) if dp and finals else None, delta)
        if not measured["below-proven"]:
            findings.append({"kind": "empirical-above-proven", "epsilon-lb": measured["epsilon-lb"],
                             "proven-epsilon": measured["proven-epsilon"]})
    declines = [p for p in ledger["participants"] if p["status"] == "declined"]
    metrics = defaultdict(dict)
    for m in ledger["metrics"]:
        metrics[m["round"]][m["name"]] = m["value"]
    return {
        "run-dir": str(run_dir),
        "unit": ledger["meta"].get("unit", UNIT),
        "adjacency": ledger["meta"].get("adjacency", "add/remove one training example of one client"),
        "trust-model": TRUST_MODEL,
        "released": RELEASED,
        "not-covered": NOT_COVERED,
        "independent-accountant": "dp-accounting 0.6 (RDP for rdp clients, PLD for prv clients)",
        "tolerance": TOLERANCE,
        "mechanisms": ledger["mechanisms"],
        "clients": sorted(clients.values(), key=lambda c: c["node"]),
        "central": central,
        "empirical": measured,
        "declines": [{k: d[k] for k in ("round", "node", "phase", "reason")} for d in declines],
        "metrics": {str(k): v for k, v in sorted(metrics.items())},
        "findings": findings,
        "ok": not findings,
    }


def recompute(history, delta: float, accountant: str) -> float:
    """ε by an implementation other than the one that reported it."""
    if accountant == CENTRAL_ACCOUNTANT:
        return epsilon(history, delta, "rdp")  # Opacus, for Flower's dp-accounting-based accountant
    return independent_epsilon(history, delta, accountant)  # dp-accounting, for Opacus' accountants


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = {}
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for c in report["clients"]:
        rows = [r for r in c["rounds"] if r["status"] != "declined"]
        ax.plot([r["round"] for r in rows], [r["recomputed"] for r in rows], marker="o", lw=1, alpha=0.8)
        if c["epsilon-max"] is not None:
            ax.axhline(c["epsilon-max"], color="grey", ls=":", lw=0.8)
    ax.set(xlabel="round (0 = popularity prior)", ylabel="cumulative ε (recomputed)",
           title="ε per client over rounds (dotted: budgets)")
    out["epsilon-per-client"] = _figure_png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    ax.hist([c["final-epsilon"] for c in report["clients"]], bins=min(20, max(5, len(report["clients"]))))
    ax.set(xlabel="final ε (recomputed)", ylabel="clients", title="Distribution of final ε")
    out["final-epsilon"] = _figure_png(fig)
    plt.close(fig)

    rounds = [r for r in report["metrics"] if "ndcg@10" in report["metrics"][r]]
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for key, style in (("ndcg@10", "-o"), ("hr@10", "-s"), ("popularity-ndcg@10", "--"), ("popularity-hr@10", ":")):
        ys = [report["metrics"][r].get(key) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot([int(r) for r in rounds], ys, style, label=key)
    ax.set(xlabel="round", ylabel="test metric", title="Utility over rounds")
    ax.legend(fontsize=8)
    out["utility"] = _figure_png(fig)
    plt.close(fig)

    if measured := report.get("empirical"):
        fig, axes = plt.subplots(1, len(measured["scores"]), figsize=(9.6, 3.0))
        for ax, (name, values) in zip(np.atleast_1d(axes), measured["scores"].items()):
            ax.hist([values["included"], values["excluded"]], bins=40, label=["included", "excluded"])
            ax.set(xlabel=f"{name} score", ylabel="canaries")
            ax.legend(fontsize=8)
        fig.suptitle("Canary membership scores (empirical audit)")
        out["canary-scores"] = _figure_png(fig)
        plt.close(fig)
    return out


def write_html(report: dict, path: Path) -> None:
    e = html.escape
    images = plots(report)
    mech_keys = ("round", "node", "phase", "mechanism", "noise_multiplier", "sample_rate", "steps", "max_grad_norm",
                 "delta", "accountant")
    rows = "".join(
        f"<tr><td>{e(c['node'])}</td><td>{c['steps']}</td><td>{c['final-reported']:.4f}</td>"
        f"<td>{c['final-epsilon']:.4f}</td><td>{'∞' if c['epsilon-max'] is None else c['epsilon-max']}</td>"
        f"<td>{c['delta']:g}</td><td>{e(c['accountant'])}</td></tr>" for c in report["clients"])
    mech = "".join("<tr>" + "".join(f"<td>{e(str(m[k]))}</td>" for k in mech_keys) + "</tr>"
                   for m in report["mechanisms"])
    findings = "".join(f"<li>{e(json.dumps(f))}</li>" for f in report["findings"]) or "<li>none</li>"
    declines = "".join(f"<li>round {d['round']} {e(d['node'])}: {e(d['reason'] or '')}</li>"
                       for d in report["declines"]) or "<li>none</li>"
    central = report["central"]
    central_html = "" if not central else f"""<h2>Client-level guarantee (server, central DP)</h2>
<p>A separate statement from the example-level one above; the two are never added.</p><ul>
<li><b>Unit of privacy:</b> {e(central['unit'])}</li><li><b>Adjacency:</b> {e(central['adjacency'])}</li>
<li><b>Trust model:</b> {e(central['trust-model'])}</li>
<li><b>Guarantee:</b> ε = {central['final-reported']:.4f} reported, {central['final-epsilon']:.4f} recomputed with
{e(central['independent-accountant'])}, at δ = {central['delta']:g}, after {central['releases']} releases
(N = {central['population']} clients, {central['expected-clients']} expected per round)</li></ul>"""
    verdict = "PASS: every reported ε recomputed within tolerance, every client within its budget" if report["ok"] \
        else f"FAIL: {len(report['findings'])} finding(s)"
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>fedrec privacy audit</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
.ok{{color:#060}}.fail{{color:#a00}}</style></head><body>
<h1>fedrec privacy audit</h1><p>Run: <code>{e(report['run-dir'])}</code></p>
<h2 class="{'ok' if report['ok'] else 'fail'}">{e(verdict)}</h2>
<h2>What is guaranteed</h2><ul>
<li><b>Unit of privacy:</b> {e(report['unit'])}</li><li><b>Adjacency:</b> {e(report['adjacency'])}</li>
<li><b>Trust model:</b> {e(report['trust-model'])}</li><li><b>Released:</b> {e(report['released'])}</li>
<li><b>Recomputed with:</b> {e(report['independent-accountant'])}; mismatch tolerance {report['tolerance']:.0%} relative</li>
</ul><h2>Not covered</h2><ul>{''.join(f'<li>{e(x)}</li>' for x in report['not-covered'])}</ul>
<h2>Clients</h2><table><tr><th>client</th><th>DP-SGD steps</th><th>final ε reported</th><th>final ε recomputed</th>
<th>ε budget</th><th>δ</th><th>accountant</th></tr>{rows}</table>
{central_html}{empirical_html(report.get("empirical"))}<h2>Findings</h2><ul>{findings}</ul><h2>Declines</h2><ul>{declines}</ul>
<h2>Plots</h2>{''.join(f'<p><img alt="{k}" src="data:image/png;base64,{v}"></p>' for k, v in images.items())}
<h2>Every mechanism run</h2><table><tr>{''.join(f'<th>{k}</th>' for k in mech_keys)}</tr>{mech}</table>
</body></html>""")


def empirical_html(measured: dict | None) -> str:
    if not measured:
        return ""
    proven = "∞ (no DP)" if measured["proven-epsilon"] is None else f"{measured['proven-epsilon']:.4f}"
    rows = "".join(f"<tr><td>{r['score']}</td><td>{r['guesses']}</td><td>{r['correct']}</td>"
                   f"<td>{r['epsilon-lb']:.4f}</td></tr>" for r in measured["by-guesses"])
    return f"""<h2>Empirical audit (one run, Steinke, Nasr &amp; Jagielski 2023)</h2>
<p>{measured['canaries']} canaries (one training example each, {measured['included']} included at random with
probability ½). Measured lower bound ε_lb = <b>{measured['epsilon-lb']:.4f}</b> at {measured['confidence']:.0%}
confidence and δ = {measured['delta']:g}, beside the proven ε = <b>{proven}</b> (largest client, example-level).
{'ε_lb ≤ proven ε, as it must be.' if measured['below-proven'] else 'ε_lb ABOVE the proven ε: a bug.'}</p>
<p>Scores: <i>popularity-prior</i> (the canary's own +1 in the round-0 histogram) and <i>adapter</i>
(what DP-SGD memorised of the canary's text → target); see simulations/empirical_audit.py.</p>
<table><tr><th>score</th><th>"included" guesses (top k)</th><th>correct</th><th>ε_lb (Bonferroni over
{measured['bonferroni-over']} score × k pairs)</th></tr>{rows}</table>"""


def main(run_dir: Path, console, empirical: bool = False) -> int:
    from rich.table import Table

    report = audit(run_dir, empirical)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    write_html(report, run_dir / "report.html")
    table = Table(title=f"Privacy audit of {run_dir.name}: ε at δ recomputed with dp-accounting")
    for col in ("client", "steps", "ε reported", "ε recomputed", "budget ε", "δ", "status"):
        table.add_column(col, justify="right")
    bad = {f["node"] for f in report["findings"]}
    for c in report["clients"]:
        table.add_row(c["node"], str(c["steps"]), f"{c['final-reported']:.4f}", f"{c['final-epsilon']:.4f}",
                      "∞" if c["epsilon-max"] is None else f"{c['epsilon-max']:g}", f"{c['delta']:g}",
                      "[red]FAIL[/red]" if c["node"] in bad else "[green]ok[/green]")
    console.print(table)
    console.print(f"Unit: {report['unit']}. Recomputed with {report['independent-accountant']}.")
    if central := report["central"]:
        console.print(f"Client-level (server, a separate guarantee): ε = {central['final-reported']:.4f} reported, "
                      f"{central['final-epsilon']:.4f} recomputed with {central['independent-accountant']}, at "
                      f"δ = {central['delta']:g} after {central['releases']} releases; {central['unit']}.")
    if measured := report["empirical"]:
        proven = "∞ (no DP)" if measured["proven-epsilon"] is None else f"{measured['proven-epsilon']:.4f}"
        console.print(f"Empirical audit: {measured['canaries']} canaries, ε_lb = {measured['epsilon-lb']:.4f} "
                      f"({measured['confidence']:.0%} confidence, δ = {measured['delta']:g}) beside the proven "
                      f"ε = {proven}; best: {measured['best']['correct']}/{measured['best']['guesses']} correct "
                      f"with the {measured['best']['score']} score")
    for f in report["findings"]:
        console.print(f"[red]{f['kind']}[/red]: {json.dumps(f)}")
    console.print(f"Report: {run_dir / 'report.html'} and report.json")
    return 0 if report["ok"] else 1

