"""Is a simulation run's lead over popularity more than chance? A paired bootstrap over users.

    python -m simulations.significance RUN_DIR [RUN_DIR ...] [--adapter ROUND] [--against ROUND]
                                       [--resamples 10000] [--out FILE] [--test]

Scores every held-out user of a simulation run twice (the validation split; ``--test``: the
test split, for a final configuration), on the run's own partition
(``partition-dir``) and split: with the run's global adapter (the last round's, or
``--adapter``) and with the popularity baseline, or with ``--against``, the same run's adapter
of another round (``--against 0``: training's lift over the untrained round 0, the prior
included in both). Users are then resampled with replacement
``--resamples`` times, the same users for both models (a paired bootstrap), and the table
gives each metric's mean for both, the relative lift, and the 95 % percentile interval of
the lift. An interval above 0 means the lead holds for other samples of users of this
kind, not just for these 943. Several run directories (seeds of one configuration, on the same
users) give the lift of their mean: each user's metrics are averaged over the runs before the
users are resampled, so the interval is that of the mean of the seeds, not of one. This
re-evaluation reads the simulated users' data, which a real federation's server never has: it
is for simulations only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from common.data import Catalog, leave_last_out, read_interactions
from common.metrics import METRICS, per_user_metrics, target_ranks
from common.model import score_users
from common.recommend import load_recommender
from audit.empirical import CANARY_FILE, read_canaries
from simulations.partition import popularity_model


def run_users(partition_dir: Path, catalog: Catalog) -> dict:
    """Every simulated user of the partition, by client folder (user ids are per-site); planted
    canaries (the empirical audit's) are left out, as the run's popularity reference leaves them."""
    canaries = {c["user"] for c in read_canaries(partition_dir)} if (partition_dir / CANARY_FILE).is_file() else set()
    users = {}
    for folder in sorted(p for p in partition_dir.glob("client-*") if p.is_dir()):
        for user, history in read_interactions(folder, catalog).items():
            if user not in canaries:
                users[(folder.name, user)] = history
    if not users:
        raise ValueError(f"partition-dir {partition_dir}: no client-*/interactions.csv (was it deleted?)")
    return users


def paired_bootstrap(model: dict[str, torch.Tensor], baseline: dict[str, torch.Tensor], resamples: int,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Per metric: both means, the relative lift mean(model)/mean(baseline) − 1 and its 95 %
    percentile interval over ``resamples`` resamplings of users (the same rows for both). Where
    the baseline scores 0 the lift is undefined: NaN."""
    n = len(next(iter(model.values())))
    rows = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    out = {}
    for k in model:
        m, b = model[k][rows].mean(1), baseline[k][rows].mean(1)
        lift = m / b.clamp(min=1e-12) - 1
        low, high = torch.quantile(lift, torch.tensor([0.025, 0.975], dtype=lift.dtype)).tolist()
        base = baseline[k].mean().item()
        out[k] = {"model": model[k].mean().item(), "baseline": base,
                  "lift": model[k].mean().item() / base - 1 if base > 0 else math.nan, "lift-low": low, "lift-high": high,
                  "p-not-better": (m <= b).double().mean().item()}
    return out


def round_adapter(run_dir: Path, round_: int | None, option: str) -> Path | None:
    """The run's saved global adapter of ``round_`` (None: none asked for)."""
    if round_ is None:
        return None
    adapter = run_dir / "adapters" / f"round-{round_:03d}"
    if not adapter.is_dir():
        raise ValueError(f"{option} {round_}: no {adapter}")
    return adapter


def score_run(run_dir: Path, adapter_round: int | None, against_round: int | None, test: bool):
    """One run's held-out users scored by its adapter and by the baseline: (split, user ids,
    the model's per-user metrics, the baseline's, the baseline's name)."""
    adapter = round_adapter(run_dir, adapter_round, "--adapter")
    against = round_adapter(run_dir, against_round, "--against")
    model, tokenizer, catalog, s = load_recommender(run_dir, adapter)
    if not s.partition_dir:
        raise ValueError(f"{run_dir}: not a simulation run (its config has no partition-dir)")
    users = run_users(Path(s.partition_dir), catalog)  # the run's catalog (its SHA-256 was checked)
    _, valid, last_items = leave_last_out(users, catalog, s.history_len)
    split, held_out = ("test", last_items) if test else ("validation", valid)
    targets = torch.tensor([ex.target for ex in held_out])
    seen = [ex.seen for ex in held_out]
    texts = [ex.text for ex in held_out]
    scores = score_users(model, tokenizer, texts, s.max_length, sequences=seen)
    if against is None:
        baseline_name, baseline = "popularity", popularity_model(users, catalog).expand(len(held_out), -1)
    else:
        baseline_name = f"round {against_round}"
        model, tokenizer, _, _ = load_recommender(run_dir, against)
        baseline = score_users(model, tokenizer, texts, s.max_length, sequences=seen)
    ids = [user for _site, user in (ex.user for ex in held_out)]  # a simulated user's id is global
    return (split, ids, per_user_metrics(target_ranks(scores, targets, seen)),
            per_user_metrics(target_ranks(baseline, targets, seen)), baseline_name)


def mean_over_runs(scored: list[tuple], run_dirs: list[Path]) -> tuple[dict, dict]:
    """Each user's metrics averaged over the runs (the same held-out users, matched by id), so
    that the bootstrap's lift is that of the runs' mean: mean of the models / mean of the baselines."""
    ids = scored[0][1]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{run_dirs[0]}: a user id held out twice; runs are matched by user id")
    model = {k: torch.zeros(len(ids), dtype=torch.float64) for k in METRICS}
    baseline = {k: torch.zeros(len(ids), dtype=torch.float64) for k in METRICS}
    for run_dir, (_, run_ids, run_model, run_baseline, _) in zip(run_dirs, scored):
        if sorted(run_ids) != sorted(ids):
            raise ValueError(f"{run_dir}: not the same held-out users as {run_dirs[0]} (give seeds of one "
                             "configuration on one dataset)")
        order = torch.tensor([run_ids.index(user) for user in ids])
        for k in METRICS:
            model[k] += run_model[k][order] / len(scored)
            baseline[k] += run_baseline[k][order] / len(scored)
    return model, baseline


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="run_dir",
                        help="one run, or several (seeds): then the lift of their mean, users paired across them")
    parser.add_argument("--adapter", type=int, help="round whose global adapter to score (default: the last)")
    parser.add_argument("--against", type=int, help="compare with this round's adapter of the run, not popularity")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--test", action="store_true", help="score the test split (a final configuration), not validation")
    args = parser.parse_args(argv)
    console = Console()
    try:
        scored = [score_run(run_dir, args.adapter, args.against, args.test) for run_dir in args.run_dirs]
        model, baseline = mean_over_runs(scored, args.run_dirs)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]significance: {e}[/red]", soft_wrap=True)
        sys.exit(2)
    split, ids, _, _, baseline_name = scored[0]
    result = paired_bootstrap(model, baseline, args.resamples)

    runs = str(args.run_dirs[0]) if len(args.run_dirs) == 1 else f"the mean of {len(args.run_dirs)} runs"
    table = Table(title=f"{runs} vs {baseline_name}: {len(ids)} {split} users, paired bootstrap of "
                        f"{args.resamples} resamples")
    for column in ("metric", "model", baseline_name, "lift", "95 % interval of the lift",
                   f"P(model ≤ {baseline_name})"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for k in METRICS:
        r = result[k]
        lift = f"{r['lift']:+.1%}" if r["baseline"] > 0 else f"undefined ({baseline_name} 0)"
        table.add_row(k, f"{r['model']:.4f}", f"{r['baseline']:.4f}", lift,
                      f"{r['lift-low']:+.1%} … {r['lift-high']:+.1%}", f"{r['p-not-better']:.4f}")
    console.print(table)
    figures = {"run-dirs": [str(d) for d in args.run_dirs], "split": split, "users": len(ids),
               "resamples": args.resamples, "baseline": baseline_name, **result}
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
