"""`fedrec audit RUN_DIR`: check every mechanism and recompute every ε of a run from its ledger.

1. **Mechanisms against the run.** Every release recorded in this run (ledger table
   ``mechanisms``) is checked against what the run config asked for: DP-SGD's σ, steps and
   clipping norm, q in (0, 1] and the same for a site in every round (public, never from a
   private size), the σ of the popularity histogram, the example count and the evaluation sums,
   and the accountant. A difference is a finding. Releases a site made before this run (its
   accountant is its own, for life) are recorded as ``unrecorded`` and listed, not checked.
2. **ε, by the auditor's own accountant.** Each ε a client reported covers the first
   ``releases`` entries of its history (ledger ``participants.releases``); the audit recomputes
   exactly those with accountant code the client does not run (``audit/accountant.py``:
   dp-accounting's PLD or RDP for a site's Opacus PRV or RDP; Opacus RDP for the server's
   central DP, which Flower accounts with dp-accounting). A reported ε further from it than the
   two accountants' stated error (``audit.accountant.tolerance``: 0.02 + 1e-3·ε for PRV, 1 %
   for RDP) is a finding, and so is an ε covering releases the ledger does not hold.
3. **The band.** Each client's final ε is shown as [dp-accounting's optimistic PLD estimate,
   the auditor's ε], the interval the exact ε lies in.
4. **Budgets.** Each client's final ε against the budget it declared.

``fedrec audit --empirical RUN_DIR`` adds the one-run canary audit of a simulation planted
with canaries (``audit/empirical.py``): a measured 95 % lower bound ε_lb beside
the proven ε; ε_lb above the proven ε is a finding.

Writes ``report.json`` (for machines) and ``report.html`` (self-contained, with plots) into
the run directory. Exit code 1 when any finding is found.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sqlite3
from collections import defaultdict
from pathlib import Path

from audit.accountant import audit_epsilon, lower_estimate, tolerance
from common.units import ADJACENCY, CLIENT_UNIT, UNITS
from common.releases import REPLIES

# The name the server's central-DP accountant has in the ledger (server/central_dp.py writes it; the
# auditor reads it and imports nothing from the server: tests/test_layout.py checks the two agree).
CENTRAL_ACCOUNTANT = "flwr-rdp"

TRUST_MODEL = (
    "Each client runs DP-SGD on its own data and keeps its own accountant and budget for its lifetime; the server "
    "and everyone who sees the global adapters or the metrics are untrusted. The guarantee needs no trust in the "
    "server: nothing it sends can reset or raise a site's budget."
)
DISTRIBUTED_TRUST_MODEL = (
    "Distributed noise (distributed-noise = true): each DP-SGD release is one noisy gradient whose noise the sites "
    "share. Each site adds σ/√T (T: SecAgg+'s threshold, at most the site's own distributed-noise-max-sites) and "
    "sends its share only inside SecAgg+, whose sum holds at least T sites' shares and so carries σ. The ε of these "
    "releases holds against a server that follows the SecAgg+ protocol (honest but curious) with at least T "
    "honest sites in each sum; a site's share alone carries σ/√T, which its releases.jsonl records. SecAgg+ rounds "
    "each share to its grid before the sum, so the server sees a sum of rounded shares rather than the Gaussian sum "
    "the ε is computed for: each release records τ, a bound on the total variation distance between the two, and "
    "δ grows by (1 + e^ε)·Σ τ, which `fedrec client audit` prints (a site refuses a share whose τ exceeds "
    "1e-30). The other "
    "releases need no trust in the server, and nothing it sends can reset or raise a site's budget.")
CENTRAL_TRUST_MODEL = (
    "The server sees each client's update and is trusted to clip it, sample clients by Poisson sampling and add "
    "the noise; everyone who sees only the global adapters (the public, other clients) is covered.")
RELEASED = "; ".join(
    f"{kind}: {name} ({field.why})" for kind, fields in REPLIES.items() for name, field in fields.items()
    if field.status == "dp")
NOT_COVERED = [
    ("Exact evaluation figures that simulated sites send (exact-*): the simulator wrote that data itself; a "
     "deployed site never sends them."),
    ("The choice of hyper-parameters, and the release of public parameters (σ, q, steps, budgets, declared "
     "sizes), which the sites make public by choice."),
    ("Floating-point effects and the PRNG: the noise comes from torch's generator seeded from the OS "
     "entropy pool, not from a cryptographically secure generator."),
]
UNIT_NOT_COVERED = {
    "example": ("Guarantees per rating or per user: the unit is one training example. A rating is masked out of the "
                "softmax of every later example of its user, so one rating touches up to all of that user's examples "
                "(20 to 737 in MovieLens-100K); per-rating or per-user protection follows only by group privacy over "
                "that many examples."),
    "user": ("A person with data at several sites: the unit is one user at one site, so such a person's protection "
             "is the composition of each site's ε."),
}
# What the run config asked each kind of release to be: (σ key, steps key or fixed steps).
EXPECTED = {
    "dp-sgd": ("noise-multiplier", "local-steps"),
    "gaussian-histogram": ("prior-noise-multiplier", 1),
    "gaussian-count": ("count-noise-multiplier", 1),
    "gaussian-eval-sums": ("eval-noise-multiplier", 1),
    "client-level-gaussian": ("central-noise-multiplier", 1),
    "client-level-gaussian-histogram": ("prior-noise-multiplier", 1),  # the prior under central DP
}


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


def check_mechanisms(mechanisms: list[dict], run_config: dict) -> list[dict]:
    """Findings for every recorded release that is not what the run config asked for."""
    findings, rates = [], {}
    for m in mechanisms:
        if m["phase"] == "unrecorded" or m["mechanism"] not in EXPECTED:
            continue
        sigma_key, steps = EXPECTED[m["mechanism"]]
        expected = {"noise_multiplier": run_config.get(sigma_key),
                    "steps": run_config.get(steps) if isinstance(steps, str) else steps}
        if m["mechanism"] == "dp-sgd":
            expected["max_grad_norm"] = run_config.get("max-grad-norm")
        if m["node"] == "server":  # a client's update is clipped to C, its histogram to 1
            histogram = m["mechanism"] == "client-level-gaussian-histogram"
            expected["max_grad_norm"] = 1.0 if histogram else run_config.get("central-clipping-norm")
        else:
            expected["accountant"] = run_config.get("accountant")
        differ = {k: {"recorded": m[k], "run-config": v} for k, v in expected.items()
                  if v is not None and not same(m[k], v)}
        q = m["sample_rate"]
        if m["mechanism"] == "dp-sgd":
            if not 0 < q <= 1:
                differ["sample_rate"] = {"recorded": q, "run-config": "in (0, 1]"}
            elif rates.setdefault(m["node"], q) != q:  # public q: fixed per site, not per round's data
                differ["sample_rate"] = {"recorded": q, "earlier": rates[m["node"]]}
        elif m["node"] != "server" and q != 1.0:
            differ["sample_rate"] = {"recorded": q, "run-config": 1.0}
        if differ:
            findings.append({"kind": "mechanism-differs", "node": m["node"], "round": m["round"],
                             "mechanism": m["mechanism"], "differs": differ})
    return findings


def same(recorded, expected) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return recorded is not None and math.isclose(float(recorded), float(expected), rel_tol=1e-12)
    return recorded == expected


def audit(run_dir: Path, empirical: bool = False) -> dict:
    """The audit as a dict (what ``report.json`` holds)."""
    ledger = read_ledger(run_dir)
    run_config = ledger["meta"].get("run-config", {})
    mechanisms = defaultdict(list)  # node -> [(round, (σ, q, steps), δ, accountant)] in ledger order
    for m in ledger["mechanisms"]:
        mechanisms[m["node"]].append((m["round"], (m["noise_multiplier"], m["sample_rate"], m["steps"]),
                                      m["delta"], m["accountant"]))
    clients, findings = {}, check_mechanisms(ledger["mechanisms"], run_config)
    for p in ledger["participants"]:
        if p["epsilon"] is None:
            continue
        node, rnd = p["node"], p["round"]
        if node == "server":  # one central release per round, its ε after it
            upto = [x for x in mechanisms[node] if x[0] <= rnd]
        else:
            upto = mechanisms[node][:p["releases"] or 0]
            if p["releases"] is None or p["releases"] > len(mechanisms[node]):
                findings.append({"kind": "unrecorded", "node": node, "round": rnd, "reported-releases":
                                 p["releases"], "ledger-releases": len(mechanisms[node])})
        history = tuple(x[1] for x in upto)
        accountant = upto[-1][3] if upto else run_config.get("accountant", "prv")
        recomputed = audit_epsilon(history, p["delta"], accountant)
        diff = abs(recomputed - p["epsilon"])
        c = clients.setdefault(node, {"node": node, "rounds": [], "accountant": accountant})
        c["rounds"].append({"round": rnd, "phase": p["phase"], "status": p["status"], "reported": p["epsilon"],
                            "recomputed": recomputed, "difference": diff})
        c.update({"epsilon-max": p["epsilon_max"], "delta": p["delta"], "history": history})
        if diff > tolerance(accountant, recomputed):
            findings.append({"kind": "mismatch", "node": node, "round": rnd, "reported": p["epsilon"],
                             "recomputed": recomputed, "difference": diff,
                             "tolerance": tolerance(accountant, recomputed)})
    for node, c in clients.items():
        history = c.pop("history")
        c["final-epsilon"] = c["rounds"][-1]["recomputed"]
        c["final-reported"] = c["rounds"][-1]["reported"]
        c["band"] = [lower_estimate(history, c["delta"], c["accountant"]), c["final-epsilon"]]
        c["steps"] = sum(x[1][2] for x in mechanisms[node] if x[1][1] < 1.0)
        c["releases"] = len(mechanisms[node])
        if c["epsilon-max"] is not None and max(c["final-reported"], c["final-epsilon"]) > c["epsilon-max"]:
            findings.append({"kind": "over-budget", "node": node, "reported": c["final-reported"],
                             "recomputed": c["final-epsilon"], "epsilon-max": c["epsilon-max"]})
    central = clients.pop("server", None)
    if central:
        central.update({"unit": ledger["meta"].get("central-unit", CLIENT_UNIT),
                        "adjacency": "add/remove all the data of one client",
                        "trust-model": CENTRAL_TRUST_MODEL, "releases": len(mechanisms["server"]),
                        "population": ledger["meta"].get("central-population"),
                        "expected-clients": ledger["meta"].get("central-expected-clients"),
                        "independent-accountant": "Opacus RDP (the server accounts with Flower's RdpAccountant)"})
    measured, gradient = None, []
    if empirical:
        measured, gradient = empirical_audits(Path(run_dir), ledger, clients)
        if measured and not measured["below-proven"]:
            findings.append({"kind": "empirical-above-proven", "epsilon-lb": measured["epsilon-lb"],
                             "proven-epsilon": measured["proven-epsilon"]})
        findings += [{"kind": "noise-below-recorded", "node": g["node"], "site": g["site"],
                      "epsilon-lb": g["epsilon-lb"], "proven-epsilon": g["proven-epsilon"]}
                     for g in gradient if not g["below-proven"]]
    sites = simulated_site_audits(Path(run_dir))
    findings += [{"kind": "site-record", "site": site["site"], "finding": f} for site in sites for f in site["findings"]]
    declines = [p for p in ledger["participants"] if p["status"] == "declined"]
    metrics = defaultdict(dict)
    for m in ledger["metrics"]:
        metrics[m["round"]][m["name"]] = m["value"]
    accountant = run_config.get("accountant", "prv")
    return {
        "run-dir": str(run_dir),
        "unit": ledger["meta"].get("unit", UNITS["example"]),
        "privacy-unit": ledger["meta"].get("privacy-unit", "example"),
        "adjacency": ledger["meta"].get("adjacency", ADJACENCY["example"]),
        "trust-model": DISTRIBUTED_TRUST_MODEL if run_config.get("distributed-noise") else TRUST_MODEL,
        "released": RELEASED,
        "not-covered": NOT_COVERED + [UNIT_NOT_COVERED[ledger["meta"].get("privacy-unit", "example")]],
        "accountant": ("dp-accounting " + ("PLD, pessimistic estimate (an upper bound)" if accountant == "prv"
                                           else "RDP") + f"; the clients account with Opacus {accountant.upper()}"),
        "independent-accountant": ("dp-accounting's optimistic PLD estimate" if accountant == "prv"
                                   else "the same RDP value (RDP has no lower estimate)"),
        "tolerance": "0.02 + 1e-3·ε" if accountant == "prv" else "1 % of ε",
        "mechanisms": ledger["mechanisms"],
        "clients": sorted(clients.values(), key=lambda c: c["node"]),
        "central": central,
        "empirical": measured,
        "gradient-canaries": gradient,
        "declines": [{k: d[k] for k in ("round", "node", "phase", "reason")} for d in declines],
        "metrics": {str(k): v for k, v in sorted(metrics.items())},
        "sites": sites,
        "findings": findings,
        "verified": verified_and_assumed(findings, central, measured, gradient, sites),
        "ok": not findings,
    }


def simulated_site_audits(run_dir: Path) -> list[dict]:
    """For a simulation, each simulated site's own records (``fedrec client audit``) against the
    ledger: the simulator played the sites, so their state is at hand. Empty for a deployment,
    where each site runs ``fedrec client audit DATA_DIR --ledger RUN_DIR`` itself."""
    from audit.site import site_audit

    config = run_dir / "config.json"
    run_config = json.loads(config.read_text())["run-config"] if config.is_file() else {}
    if not run_config.get("partition-dir") or not run_config.get("run-dir"):
        return []
    name = Path(run_config["run-dir"]).name
    sites = []
    for folder in sorted(Path(run_config["partition-dir"]).glob("client-*")):
        state = folder / "state" / name
        # A run from before sites kept a release log is not checked here.
        if (state / "accountant.json").is_file() and (state / "releases.jsonl").is_file():
            report = site_audit(folder, state, run_dir)
            sites.append({"site": folder.name, "node": report["ledger"]["name"], "releases": len(report["releases"]),
                          "findings": report["findings"]})
    return sites


def verified_and_assumed(findings: list[dict], central, measured, gradient: list, sites: list) -> list[dict]:
    """Point by point, what this audit checked (and its outcome) and what it had to take on trust."""
    kinds = {f["kind"] for f in findings}

    def outcome(*bad: str) -> str:
        return "failed" if kinds & set(bad) else "verified"

    rows = [
        ("accounting", outcome("mismatch", "unrecorded"),
         "every ε a site reported, recomputed from the ledger's mechanisms with accountant code the sites do not run"),
        ("mechanisms", outcome("mechanism-differs"),
         "every recorded release's σ, q, steps and clipping norm against the run config; q fixed per site"),
        ("budgets", outcome("over-budget"), "every site's final ε within the budget it declared"),
        ("sites' own records", outcome("site-record") if sites else "assumed",
         f"{len(sites)} simulated sites' release logs and accountants against the ledger" if sites else
         "no site release logs at hand (a deployment, or a run from before sites kept them): each site checks "
         "with `fedrec client audit DATA_DIR --ledger RUN_DIR`"),
        ("noise really added", outcome("noise-below-recorded") if gradient else "assumed",
         f"white-box DP-SGD canaries at {len(gradient)} sites" if gradient else
         "no white-box canaries in this run (simulate with gradient-canaries=N; a site adds gradient-canaries.json "
         "to its data folder); the ledger's σ is what the sites say they added"),
        ("memorisation of released adapters", outcome("empirical-above-proven") if measured else "not measured",
         "example canaries planted in the data" if measured else "no example canaries in this run (canaries=N)"),
        ("code the sites ran", "assumed",
         "that each site ran the ClientApp it reviewed: the ledger cannot show it; a site pins it itself with "
         "`fedrec client superexec` (approved bundle hashes) or Flower's --trusted-entities (Flower Hub signatures)"),
        ("noise generator", "assumed", "torch's generator seeded from the OS entropy pool"),
    ]
    if central:
        rows.append(("central DP", "assumed", "the server clipped, sampled and noised as its ledger rows say: "
                                              "its noise is not checked empirically"))
    return [{"check": c, "status": st, "how": how} for c, st, how in rows]


def empirical_audits(run_dir: Path, ledger: dict, clients: dict) -> tuple[dict | None, list[dict]]:
    """The canary audits the run was planted for: example canaries in the data (the released
    adapters' memory of them) and each site's white-box DP-SGD canaries (its noise)."""
    from audit.empirical import CANARY_FILE, empirical_audit, gradient_canary_audit
    from audit.site import pseudonym

    run_config = json.loads((run_dir / "config.json").read_text())["run-config"]
    partition_dir = Path(run_config["partition-dir"])
    measured = None
    if (partition_dir / CANARY_FILE).is_file():
        finals = [c["final-epsilon"] for c in clients.values()]
        delta = max((c["delta"] for c in clients.values()), default=1e-5)
        dp = run_config.get("dp", True)
        measured = empirical_audit(run_dir, max(finals) if dp and finals else None, delta)
    key = ledger["meta"].get("pseudonym-key")
    gradient = gradient_canary_audit(partition_dir, Path(run_config["run-dir"]).name,
                                     lambda client: pseudonym(key, client), audit_epsilon)
    if measured is None and not gradient:
        raise FileNotFoundError(f"{partition_dir}: this run has no canaries; simulate with --set canaries=1000 "
                                "(example canaries) or gradient-canaries=1000 (white-box DP-SGD canaries)")
    return measured, gradient


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

    rounds = [r for r in report["metrics"] if "val-ndcg@10" in report["metrics"][r]]
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for key, style in (("val-ndcg@10", "-o"), ("val-hr@10", "-s"), ("popularity-val-ndcg@10", "--"),
                       ("popularity-val-hr@10", ":"), ("ndcg@10", "D"), ("hr@10", "^")):
        ys = [report["metrics"][r].get(key) for r in rounds]
        if any(y is not None for y in ys):  # the test split (no prefix) is scored at a final run's last round only
            ax.plot([int(r) for r in rounds], ys, style, label=key if key.startswith(("val-", "popularity-val-"))
                    else f"test {key}")
    ax.set(xlabel="round", ylabel="metric", title="Utility over rounds (validation; test where read)")
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
        f"<td>{c['final-epsilon']:.4f}</td><td>{c['band'][0]:.4f} – {c['band'][1]:.4f}</td>"
        f"<td>{c['releases']}</td><td>{'∞' if c['epsilon-max'] is None else c['epsilon-max']}</td>"
        f"<td>{c['delta']:g}</td><td>{e(c['accountant'])}</td></tr>" for c in report["clients"])
    mech = "".join("<tr>" + "".join(f"<td>{e(str(m[k]))}</td>" for k in mech_keys) + "</tr>"
                   for m in report["mechanisms"])
    findings = "".join(f"<li>{e(json.dumps(f))}</li>" for f in report["findings"]) or "<li>none</li>"
    declines = "".join(f"<li>round {d['round']} {e(d['node'])}: {e(d['reason'] or '')}</li>"
                       for d in report["declines"]) or "<li>none</li>"
    verified_rows = "".join(f"<tr><td>{e(v['check'])}</td><td>{e(v['status'])}</td><td style='text-align:left'>"
                            f"{e(v['how'])}</td></tr>" for v in report["verified"])
    central = report["central"]
    central_html = "" if not central else f"""<h2>Client-level guarantee (server, central DP)</h2>
<p>A separate statement from the example-level one above; the two are never added.</p><ul>
<li><b>Unit of privacy:</b> {e(central['unit'])}</li><li><b>Adjacency:</b> {e(central['adjacency'])}</li>
<li><b>Trust model:</b> {e(central['trust-model'])}</li>
<li><b>Guarantee:</b> ε = {central['final-reported']:.4f} reported, {central['final-epsilon']:.4f} recomputed with
{e(central['independent-accountant'])}, at δ = {central['delta']:g}, after {central['releases']} releases
(N = {central['population']} clients, {central['expected-clients']} expected per round)</li></ul>"""
    verdict = ("PASS: every release is what the run asked for, every reported ε agrees with the auditor's own accountant, every client "
               "is within its budget") if report["ok"] \
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
<li><b>Recomputed with:</b> {e(report['accountant'])}, mismatch tolerance {e(report['tolerance'])}; the band's lower end from
{e(report['independent-accountant'])}</li>
</ul><h2>Not covered</h2><ul>{''.join(f'<li>{e(x)}</li>' for x in report['not-covered'])}</ul>
<h2>Clients</h2><table><tr><th>client</th><th>DP-SGD steps</th><th>final ε reported</th><th>final ε recomputed</th>
<th>band: exact ε within</th><th>releases</th><th>ε budget</th><th>δ</th><th>accountant</th></tr>{rows}</table>
<h2>Verified and assumed</h2><table><tr><th>check</th><th>status</th><th>how</th></tr>{verified_rows}</table>
{central_html}{empirical_html(report.get("empirical"))}{gradient_html(report.get("gradient-canaries"))}<h2>Findings</h2><ul>{findings}</ul><h2>Declines</h2><ul>{declines}</ul>
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
(what DP-SGD memorised of the canary's text → target); see audit/empirical.py.</p>
<table><tr><th>score</th><th>"included" guesses (top k)</th><th>correct</th><th>ε_lb (Bonferroni over
{measured['bonferroni-over']} score × k pairs)</th></tr>{rows}</table>"""


def gradient_html(sites: list[dict] | None) -> str:
    if not sites:
        return ""
    rows = "".join(
        f"<tr><td>{s['site']}</td><td>{s['node']}</td><td>{s['canaries']}</td><td>{s['steps']}</td>"
        f"<td>{s['recorded-sigma']:g}</td><td>{s['best']['correct']}/{s['best']['guesses']} ({s['best']['score']})</td>"
        f"<td>{s['epsilon-lb']:.3f}</td><td>{s['proven-epsilon']:.3f}</td>"
        f"<td>{'ok' if s['below-proven'] else 'NOISE BELOW WHAT IT RECORDED'}</td></tr>" for s in sites)
    return f"""<h2>White-box DP-SGD canaries (each site's noise, checked)</h2>
<p>Each site ran m random-direction canaries through every DP-SGD step (included with probability ½,
Poisson-sampled like its examples) and observed each step's noisy sum along their directions. A 95 % lower bound
ε_lb (Steinke, Nasr &amp; Jagielski 2023; the 5 % split over every site, score and k) above the proven ε of its
DP-SGD steps at the σ it recorded means the site added less noise than it recorded.</p>
<table><tr><th>site</th><th>ledger name</th><th>canaries</th><th>steps</th><th>recorded σ</th>
<th>best guesses</th><th>ε_lb</th><th>proven ε of its DP-SGD steps (δ = {sites[0]['delta']:g}, the unit above,
the auditor's accountant)</th><th>verdict</th>
</tr>{rows}</table>"""


def main(run_dir: Path, console, empirical: bool = False) -> int:
    from rich.table import Table

    report = audit(run_dir, empirical)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1))
    write_html(report, run_dir / "report.html")
    table = Table(title=f"Privacy audit of {run_dir.name}: every release checked, every ε recomputed")
    for col in ("client", "releases", "ε reported", "ε recomputed", "exact ε within", "budget ε", "δ", "status"):
        table.add_column(col, justify="right")
    bad = {f.get("node") for f in report["findings"]}
    for c in report["clients"]:
        table.add_row(c["node"], str(c["releases"]), f"{c['final-reported']:.4f}", f"{c['final-epsilon']:.4f}",
                      f"{c['band'][0]:.4f}–{c['band'][1]:.4f}",
                      "∞" if c["epsilon-max"] is None else f"{c['epsilon-max']:g}", f"{c['delta']:g}",
                      "[red]FAIL[/red]" if c["node"] in bad else "[green]ok[/green]")
    console.print(table)
    console.print(f"Unit: {report['unit']}. Recomputed with {report['accountant']} (tolerance "
                  f"{report['tolerance']}); the band's lower end is {report['independent-accountant']}.")
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
    checks = Table(title="What this audit verified and what it assumed")
    for col in ("check", "status", "how"):
        checks.add_column(col)
    colour = {"verified": "green", "failed": "red"}
    for v in report["verified"]:
        checks.add_row(v["check"], f"[{colour.get(v['status'], 'yellow')}]{v['status']}[/]", v["how"])
    console.print(checks)
    for g in report["gradient-canaries"]:
        console.print(f"White-box canaries, {g['site']} ({g['node']}): ε_lb = {g['epsilon-lb']:.3f} "
                      f"({g['confidence']:.0%}, split over {len(report['gradient-canaries'])} sites) beside the "
                      f"proven ε = {g['proven-epsilon']:.3f} ({report['privacy-unit']}-level, δ = {g['delta']:g}, "
                      f"{report['accountant'].split(';')[0]}) of its {g['steps']} DP-SGD steps at σ = "
                      f"{g['recorded-sigma']:g}: " + ("ok" if g["below-proven"] else "[red]its noise is below what "
                                                       "it recorded[/red]"))
    for f in report["findings"]:
        console.print(f"[red]{f['kind']}[/red]: {json.dumps(f)}")
    console.print(f"Report: {run_dir / 'report.html'} and report.json")
    return 0 if report["ok"] else 1

