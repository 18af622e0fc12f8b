"""Is a simulation run's lead over popularity more than chance? A paired bootstrap over users.

    python -m simulations.significance RUN_DIR [--adapter ROUND] [--resamples 10000] [--out FILE] [--test]

Scores every held-out user of a simulation run twice (the validation split; ``--test``: the
test split, for a final configuration), on the run's own partition
(``partition-dir``) and split: with the run's global adapter (the last round's, or
``--adapter``) and with the popularity baseline. Users are then resampled with replacement
``--resamples`` times, the same users for both models (a paired bootstrap), and the table
gives each metric's mean for both, the relative lift, and the 95 % percentile interval of
the lift. An interval above 0 means the lead holds for other samples of users of this
kind, not just for these 943. This re-evaluation reads the simulated users' data, which a
real federation's server never has: it is for simulations only.
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
        out[k] = {"model": model[k].mean().item(), "popularity": base,
                  "lift": model[k].mean().item() / base - 1 if base > 0 else math.nan, "lift-low": low, "lift-high": high,
                  "p-not-better": (m <= b).double().mean().item()}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--adapter", type=int, help="round whose global adapter to score (default: the last)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--test", action="store_true", help="score the test split (a final configuration), not validation")
    args = parser.parse_args(argv)
    console = Console()
    try:
        adapter = args.run_dir / "adapters" / f"round-{args.adapter:03d}" if args.adapter is not None else None
        if adapter is not None and not adapter.is_dir():
            raise ValueError(f"--adapter {args.adapter}: no {adapter}")
        model, tokenizer, catalog, s = load_recommender(args.run_dir, adapter)
        if not s.partition_dir:
            raise ValueError(f"{args.run_dir}: not a simulation run (its config has no partition-dir)")
        users = run_users(Path(s.partition_dir), catalog)  # the run's catalog (its SHA-256 was checked)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]significance: {e}[/red]", soft_wrap=True)
        sys.exit(2)
    _, valid, test = leave_last_out(users, catalog, s.history_len)
    split, held_out = ("test", test) if args.test else ("validation", valid)
    targets = torch.tensor([ex.target for ex in held_out])
    seen = [ex.seen for ex in held_out]
    scores = score_users(model, tokenizer, [ex.text for ex in held_out], s.max_length, sequences=seen)
    popularity = popularity_model(users, catalog).expand(len(held_out), -1)
    result = paired_bootstrap(per_user_metrics(target_ranks(scores, targets, seen)),
                              per_user_metrics(target_ranks(popularity, targets, seen)), args.resamples)

    table = Table(title=f"{args.run_dir} vs popularity: {len(held_out)} {split} users, paired bootstrap of "
                        f"{args.resamples} resamples")
    for column in ("metric", "model", "popularity", "lift", "95 % interval of the lift", "P(model ≤ popularity)"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for k in METRICS:
        r = result[k]
        lift = f"{r['lift']:+.1%}" if r["popularity"] > 0 else "undefined (popularity 0)"
        table.add_row(k, f"{r['model']:.4f}", f"{r['popularity']:.4f}", lift,
                      f"{r['lift-low']:+.1%} … {r['lift-high']:+.1%}", f"{r['p-not-better']:.4f}")
    console.print(table)
    figures = {"run-dir": str(args.run_dir), "split": split, "users": len(held_out), "resamples": args.resamples,
               **result}
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
