"""The privacy-unit study: NDCG@10 against ε, example-level beside user-level DP, 10 silos.

    python -m simulations.study --out runs/study          # runs what is missing, then reports
    python -m simulations.study --out runs/study --report-only
    python -m simulations.study --out runs/study --only default centralized --references runs/references

Each configuration is one ``fedrec simulate`` run of MovieLens-100K in 10 silos (its own run
directory under ``--out``; a finished one is never run again, so the command resumes). For a
target ε the noise multiplier σ is solved so that a site's whole-run ε, every release composed
(the prior, each round's DP-SGD and count, each round's evaluation; Opacus PRV, δ = 1e-5),
is at most the target: ε is fixed in advance, never tuned on results.

* example level: the defaults (64 examples per step, 40 steps per round, σ_h = 10), σ solved
  (the sequence tower's lead on validation was measured on its earlier, non-causal form:
  README, "The sequence tower: first measurements");
* user level: the configuration that led on validation (README, Results): sequence training,
  the tower alone on whole user sequences of up to 50 items, one user per DP-SGD sample
  (``sequence-dim = 32``), 32 users per step, 10 steps per round, and the budget split toward
  the prior: σ_h = σ / 2 (at ε = 8 the σ_h = 1.0, σ = 2.0027 that validation chose over
  σ_h = σ), σ solved;
* non-private: the defaults with ``dp = false``;
* default: the defaults as they are (example level, σ = 1), whose per-round validation curve
  the figure shows;
* centralized: the same model on one machine, no federation and no DP
  (``python -m simulations.centralized --test``, as many optimizer steps as the federated run's
  10 silos × 5 rounds × 40).

The field's reference models (``python -m simulations.references``, RecBole's SASRec, GRU4Rec,
BPR-MF, 3 seeds) join the table and the figure when ``--references`` holds their results.

Protocol: the configurations and the round reported (the last) are fixed before any run.
Validation figures are for choices; the test column is read here, once per configuration, and
is the one to quote: every run here is a ``fedrec simulate --test`` (or ``centralized --test``),
which scores its last round on the test split. Writes ``study.md`` (table) and ``study.png``
(test NDCG@10 against ε, beside the reference lines; and the runs' validation curves by round).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from common.config import Settings, defaults, fedrec_home, parse_overrides
from common.privacy import epsilon

TARGETS = (1.0, 3.0, 8.0)
SILOS, SITE_USERS, SITE_EXAMPLES = 10, 94, 9717  # MovieLens-100K in 10 silos: the declared sizes
UNIT_SETTINGS = {
    "example": {},
    "user": {"privacy-unit": "user", "batch-size": 32, "local-steps": 10, "sequence-training": "true",
             "sequence-length": 50, "sequence-dim": 32},
}
# The prior's σ_h over DP-SGD's σ: user level spends more of the budget on the prior, where its
# users' data does more (README, "The budget split toward the prior").
PRIOR_RATIO = {"example": None, "user": 0.5}
METRICS = ("ndcg@10", "hr@10", "recall@20")
CENTRALIZED_STEPS = 2000  # the federated default's optimizer steps: 10 silos × 5 rounds × 40 local steps
# Configurations with nothing to solve: main() adds them to every plan, old study folders' too.
FIXED = [{"name": "default", "unit": "example", "target": None, "set": {}},
         {"name": "centralized", "unit": "none", "target": None, "set": {}, "kind": "centralized"}]
PUBLISHED_REFERENCES = Path(__file__).resolve().parents[1] / "docs" / "references" / "references.json"
console = Console()


def site_history(s: Settings, declared: int) -> list[tuple[float, float, int]]:
    """Every release one site makes in a run of ``s``, as its accountant records them."""
    q = min(1.0, s.batch_size / declared)
    rounds = s.num_server_rounds
    prior = [(s.prior_noise_multiplier, 1.0, 1)] if s.popularity_prior else []
    return (prior + [(s.noise_multiplier, q, s.local_steps), (s.count_noise_multiplier, 1.0, 1)] * rounds
            + [(s.eval_noise_multiplier, 1.0, 1)] * rounds)


def solve_sigma(unit: str, target: float) -> tuple[float, float]:
    """The smallest σ (to 0.5 %) whose whole-run site ε is at most ``target``; (σ, that ε)."""
    overrides = UNIT_SETTINGS[unit]
    declared = SITE_USERS if unit == "user" else SITE_EXAMPLES

    def eps(sigma: float) -> float:
        as_set = parse_overrides([f"{k}={v}" for k, v in overrides.items()])  # as `--set` reads them
        config = {**defaults(), **as_set, "noise-multiplier": sigma}
        if PRIOR_RATIO[unit]:
            config["prior-noise-multiplier"] = sigma * PRIOR_RATIO[unit]
        s = Settings.from_run_config(config)
        return epsilon(site_history(s, declared), s.delta, s.accountant)

    low, high = 0.2, 64.0
    while high / low > 1.005:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if eps(mid) <= target else (mid, high)
    return high, eps(high)


def configurations() -> list[dict]:
    runs = []
    for unit in ("user", "example"):
        for target in reversed(TARGETS):
            sigma, eps = solve_sigma(unit, target)
            chosen = {**UNIT_SETTINGS[unit], "noise-multiplier": round(sigma, 4)}
            if PRIOR_RATIO[unit]:
                chosen["prior-noise-multiplier"] = round(sigma * PRIOR_RATIO[unit], 4)
            runs.append({"name": f"{unit}-eps{target:g}", "unit": unit, "target": target, "planned-epsilon": eps,
                         "set": chosen})
    return runs[:1] + [{"name": "non-private", "unit": "none", "target": None, "set": {"dp": "false"}}] + runs[1:]


def run(config: dict, out: Path) -> None:
    run_dir = out / config["name"]
    if (run_dir / "summary.json").is_file():
        return
    if run_dir.exists():  # an interrupted run: start it again from nothing, its simulated sites too
        shutil.rmtree(run_dir)
        for state in (fedrec_home() / "partitions").glob(f"*/client-*/state/{run_dir.name}"):
            shutil.rmtree(state)
    overrides = [f"{k}={v}" for k, v in config["set"].items()]
    if config.get("kind") == "centralized":
        command = [sys.executable, "-m", "simulations.centralized", "--test", "--steps", str(CENTRALIZED_STEPS),
                   "--eval-every", str(CENTRALIZED_STEPS // 5), "--out", str(run_dir / "centralized.json")]
        console.print(f"[bold]{config['name']}[/bold]: {' '.join(command[1:])}")
        started = time.time()
        subprocess.run(command, check=True)
        (run_dir / "summary.json").write_text(json.dumps({"wall-s": round(time.time() - started, 1)}))
        return
    console.print(f"[bold]{config['name']}[/bold]: fedrec simulate --test --clients {SILOS} --set {' '.join(overrides)}")
    fedrec = Path(sys.executable).with_name("fedrec")
    subprocess.run([str(fedrec), "simulate", "--test", "--clients", str(SILOS), "--run-dir", str(run_dir), "--set",
                    *overrides], check=True)


def result(config: dict, out: Path) -> dict:
    run_dir = out / config["name"]
    if config.get("kind") == "centralized":
        figures = json.loads((run_dir / "centralized.json").read_text())
        return {**config, "rounds": None, "epsilon": None, "valid": figures["valid"], "test": figures["test"],
                "wall-s": json.loads((run_dir / "summary.json").read_text())["wall-s"],
                "valid-curve": [point["val-ndcg@10"] for point in figures["curve"]],
                "popularity-test": figures["popularity"]["test"]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    last = rows[-1]
    return {**config, "rounds": len(rows), "wall-s": summary.get("wall-s"),
            "epsilon": summary.get("client-epsilon-max"),
            "valid": {k: last[f"val-{k}"] for k in METRICS}, "test": {k: last[k] for k in METRICS},
            "valid-curve": [r["val-ndcg@10"] for r in rows],
            "popularity-test": {k: last.get(f"popularity-{k}") for k in METRICS}}


def references(folder: Path | None) -> dict:
    """RecBole's models from ``python -m simulations.references`` (mean, std over 3 seeds): the
    folder's results if it has them, else the published ones (``docs/references``)."""
    for path in ([folder / "references.json"] if folder else []) + [PUBLISHED_REFERENCES]:
        if path.is_file():
            console.print(f"reference models: {path}")
            return json.loads(path.read_text())
    return {}


def table(results: list[dict], reference: dict) -> str:
    lines = ["| run | unit | ε (δ = 1e-5, PRV, per site) | σ | val NDCG@10 | test NDCG@10 | test HR@10 | "
             "test Recall@20 | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        sigma = r["set"].get("noise-multiplier", "–")
        lines.append(f"| {r['name']} | {r['unit']} | {eps} | {sigma} | {r['valid']['ndcg@10']:.4f} | "
                     f"{r['test']['ndcg@10']:.4f} | {r['test']['hr@10']:.4f} | {r['test']['recall@20']:.4f} | "
                     f"{r['wall-s']} |")
    pop = results[0]["popularity-test"]
    lines.append(f"| popularity | – | 0 (exact counts) | – | – | {pop['ndcg@10']:.4f} | {pop['hr@10']:.4f} | "
                 f"{pop['recall@20']:.4f} | – |")
    for name, row in reference.items():
        cell = lambda key: f"{row[key][0]:.4f} ± {row[key][1]:.4f}"  # noqa: E731
        lines.append(f"| {name} (RecBole 1.2.1, centralized, {len(row['seeds'])} seeds) | none | ∞ (no DP) | – | "
                     f"{cell('valid ndcg@10')} | {cell('test ndcg@10')} | {cell('test hr@10')} | "
                     f"{cell('test recall@20')} | – |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, curves) = plt.subplots(1, 2, figsize=(11, 4))
    for unit, marker in (("example", "o"), ("user", "s")):
        rows = sorted((r for r in results if r["unit"] == unit), key=lambda r: r["epsilon"])
        ax.plot([r["epsilon"] for r in rows], [r["test"]["ndcg@10"] for r in rows], marker=marker,
                label=f"{unit}-level DP")
    lines = [(r["test"]["ndcg@10"], "non-private federated" if r["name"] == "non-private" else "centralized, no DP")
             for r in results if r["name"] in ("non-private", "centralized")]
    lines += [(row["test ndcg@10"][0], f"{name} (RecBole, no DP)") for name, row in reference.items()]
    for (value, label), style in zip(lines, ("--", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1)))):
        ax.axhline(value, color="grey", linestyle=style, label=label)
    ax.axhline(results[0]["popularity-test"]["ndcg@10"], color="black", linestyle=":", label="popularity")
    ax.set(xscale="log", xlabel="ε per site (δ = 1e-5, PRV)", ylabel="test NDCG@10",
           title="MovieLens-100K, 10 silos, final round")
    ax.set_xticks(TARGETS, [f"{t:g}" for t in TARGETS])
    ax.minorticks_off()
    ax.set_ylim(top=max(value for value, _ in lines) + 0.03)  # the legend above every line, hiding none
    ax.legend(loc="upper left", ncol=2, fontsize="x-small")
    for r in results:
        default = r["name"] == "default"
        curves.plot(range(1, len(r["valid-curve"]) + 1), r["valid-curve"], marker="o" if default else None,
                    linewidth=2.5 if default else 1, label=r["name"], zorder=3 if default else 2)
    curves.set(xlabel="round (centralized: evaluation point)", ylabel="validation NDCG@10",
               title="Validation by round (choices are made here)")
    curves.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--report-only", action="store_true", help="report the runs that finished; run nothing")
    parser.add_argument("--only", nargs="*", default=[], help="run only these configurations (names)")
    parser.add_argument("--references", type=Path, default=Path("runs/references"),
                        help="python -m simulations.references --out folder, for the reference models' lines "
                        "(without results there: the published docs/references)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan_file = args.out / "plan.json"  # solving σ takes minutes: once per study folder
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else configurations()
    plan += [c for c in FIXED if c["name"] not in {p["name"] for p in plan}]
    plan_file.write_text(json.dumps(plan, indent=1))
    if not args.report_only:
        named = {c["name"]: c for c in plan}
        for config in [named[name] for name in args.only] if args.only else plan:
            run(config, args.out)
    done = [result(c, args.out) for c in plan if (args.out / c["name"] / "summary.json").is_file()]
    if not done:
        console.print("no finished runs yet")
        return 1
    console.print("Test figures are read here, once per configuration (the final round, fixed in advance).")
    (args.out / "study.json").write_text(json.dumps(done, indent=1))
    reference = references(args.references)
    (args.out / "study.md").write_text(table(done, reference))
    console.print(table(done, reference))
    figure(done, reference, args.out / "study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
