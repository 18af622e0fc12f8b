"""The untrained model's grid, on the validation split: what the defaults' starting point rests on.

    python -m simulations.starting_point                          # layers 2 4 6 × history 1 3 × s 4 8 16
    python -m simulations.starting_point --layers 6 --history 1 --scale 8

Scores every configuration of encoder depth (``model-layers``), user text length
(``history-len``) and score scale s (``initial-score-scale``) before any training: LoRA B = 0,
so ``score = s · cos(u, e_item) + log(1 + count_item)`` with the exact training-target counts
(no DP noise: this isolates the encoder's similarity). Full ranking of all 1,682 items for all
943 users, on the **validation** split only: these figures choose defaults, so the test split is
never read here. Prints a table and writes it as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from client.train import evaluate
from common.config import Settings, defaults, parse_overrides
from common.data import leave_last_out, load_movielens
from common.metrics import unit_histogram
from common.model import adapter_config, build_model, load_encoder, refresh_item_embeddings, set_item_bias
from simulations.partition import select_users


def untrained_validation(s: Settings, users: dict, catalog) -> dict[str, float]:
    """HR@10, NDCG@10, Recall@20 of the untrained model of ``s`` on the validation split."""
    train_examples, valid, _ = leave_last_out(users, catalog, s.history_len)
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    model = build_model(encoder, len(catalog), adapter_config(s, encoder), seed=s.seed,
                        init_scale=s.initial_score_scale, prefix_cache_mb=s.prefix_cache_mb,
                        frozen_precision=s.frozen_precision)
    set_item_bias(model, unit_histogram(train_examples, len(catalog), "example"))
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    return evaluate(model, tokenizer, valid, s.max_length)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6], help="model-layers values")
    parser.add_argument("--history", type=int, nargs="+", default=[1, 3], help="history-len values")
    parser.add_argument("--scale", type=float, nargs="+", default=[4.0, 8.0, 16.0], help="initial-score-scale values")
    parser.add_argument("--max-users", type=int, default=0, help="0 = all 943 users")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other run-config overrides")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    base = Settings.from_run_config({**defaults(), **parse_overrides(args.set)})
    catalog, interactions = load_movielens(base.dataset or None)
    users = select_users(interactions, args.max_users, base.seed)
    grid = list(itertools.product(args.layers, args.history, args.scale))
    rows = []
    for layers, history, scale in track(grid, description="untrained model, validation split"):
        s = dataclasses.replace(base, model_layers=layers, history_len=history, initial_score_scale=scale)
        rows.append({"model-layers": layers, "history-len": history, "initial-score-scale": scale,
                     "valid": untrained_validation(s, users, catalog)})
    table = Table(title=f"Untrained model (LoRA B = 0, exact popularity prior): validation split, {len(users)} users")
    for column in ("model-layers", "history-len", "s", "val HR@10", "val NDCG@10", "val Recall@20"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["model-layers"]), str(r["history-len"]), f"{r['initial-score-scale']:g}",
                      *(f"{r['valid'][k]:.4f}" for k in ("hr@10", "ndcg@10", "recall@20")))
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
