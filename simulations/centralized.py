"""Centralized reference: the same model on the same split, trained on one machine.

    python -m simulations.centralized --steps 600 --out runs/centralized.json
    python -m simulations.centralized --dp --steps 240 --set noise-multiplier=0.32
    python -m simulations.centralized --steps 600 --test    # a final configuration: the test split too

Uses the same data loading, leave-last-out split, model, loss and metrics as the
federated run; only the federation is removed, and DP too unless ``--dp`` (then DP-SGD with
the run's σ and C on all training examples, a popularity prior with N(0, σ_h²) noise, and
ε accounted over both). Prints HR@10 / NDCG@10 / Recall@20 beside the popularity baseline, on
the validation split (what choices are made on), and on the test split too with ``--test``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from client.train import evaluate, privacy_units, train
from common.config import Settings, defaults, parse_overrides
from common.data import leave_last_out, load_movielens
from common.metrics import unit_histogram
from common.model import (adapter_config, build_model, load_encoder, refresh_item_embeddings, sequence_options,
                          set_item_bias)
from common.privacy import statement
from simulations.partition import popularity_reference, select_users


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps in all")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--max-users", type=int, default=0, help="0 = all 943 users")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--test", action="store_true", help="also score the test split (a final configuration)")
    parser.add_argument("--dp", action="store_true", help="DP-SGD with the run's noise-multiplier and max-grad-norm")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="run-config overrides, e.g. learning-rate=0.01 history-len=8")
    args = parser.parse_args(argv)
    s = dataclasses.replace(Settings.from_run_config({**defaults(), **parse_overrides(args.set)}),
                            dp=args.dp, max_users=args.max_users)

    catalog, interactions = load_movielens(s.dataset or None)
    users = select_users(interactions, s.max_users, s.seed)
    train_ex, valid, test = leave_last_out(users, catalog, s.history_len)
    popularity = popularity_reference(users, catalog, s.history_len)
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    model = build_model(encoder, len(catalog), adapter_config(s, encoder), seed=s.seed,
                        init_scale=s.initial_score_scale, prefix_cache_mb=s.prefix_cache_mb,
                        frozen_precision=s.frozen_precision, **sequence_options(s))
    history = []
    if s.popularity_prior:  # the federated run's prior, from one histogram
        counts = unit_histogram(train_ex, len(catalog), s.privacy_unit)
        if s.dp:
            noise = torch.randn(len(catalog), generator=torch.Generator().manual_seed(secrets.randbits(63)))
            counts += s.prior_noise_multiplier * noise
            history = [(s.prior_noise_multiplier, 1.0, 1)]
        set_item_bias(model, counts)

    # One dataset whose size is public (the whole of MovieLens' split): q from it.
    q = min(1.0, s.batch_size / len(privacy_units(train_ex, s.privacy_unit)))
    console = Console()
    curve, started, done = [], time.time(), 0
    with Progress(console=console) as progress:
        task = progress.add_task("centralized training", total=args.steps)
        while done < args.steps:
            chunk = min(args.eval_every, args.steps - done)
            refresh_item_embeddings(model, tokenizer, catalog.texts())
            result = train(model, tokenizer, train_ex, dataclasses.replace(s, local_steps=chunk), history, s.seed + done, q)
            history = result.history
            done += chunk
            refresh_item_embeddings(model, tokenizer, catalog.texts())
            val = evaluate(model, tokenizer, valid, s.max_length)
            curve.append({"steps": done, "train-loss": result.loss, **{f"val-{k}": v for k, v in val.items()}})
            progress.update(task, advance=chunk, description=f"loss {result.loss:.3f} val ndcg@10 {val['ndcg@10']:.4f}")
    scored = {"valid": val} | ({"test": evaluate(model, tokenizer, test, s.max_length)} if args.test else {})
    figures = {
        "users": len(test), "train-examples": len(train_ex), "steps": args.steps, "batch-size": s.batch_size,
        "epochs": args.steps * s.batch_size / len(train_ex), "wall-s": round(time.time() - started, 1),
        **scored, "popularity": {split: popularity[split] for split in scored}, "curve": curve,
        "settings": dataclasses.asdict(s), "epsilon": result.epsilon if s.dp else None,
    }
    privacy = f"DP, ε = {result.epsilon:.2f} at δ = {s.delta:g}" if s.dp else "no DP"
    table = Table(title=f"Centralized, {privacy} ({len(test)} users, {args.steps} steps, {figures['wall-s']} s)")
    table.add_column("model")
    table.add_column("split")
    for k in val:
        table.add_column(k, justify="right")
    model_name = "sequence tower (sequence-training)" if s.sequence_training else "LoRA two-tower"
    for split, metrics in scored.items():
        name = "validation" if split == "valid" else "test (read once)"
        table.add_row(model_name, name, *(f"{v:.4f}" for v in metrics.values()))
        table.add_row("popularity", name, *(f"{popularity[split][k]:.4f}" for k in metrics))
    console.print(table)
    if s.dp:
        privacy = statement(result.epsilon, s.delta, s.accountant, s.privacy_unit)
        console.print(f"Privacy: {privacy}, over the prior and {args.steps} DP-SGD steps on all users' examples "
                      "as one dataset.")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
