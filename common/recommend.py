"""Use a global adapter: load it from a run directory and rank the catalog for a history."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from common.config import Settings, defaults
from common.data import Interaction, read_catalog, user_text
from common.model import Recommender, device, load_encoder, refresh_item_embeddings, score_users, sequence_options


def latest_adapter(run_dir: Path) -> Path:
    rounds = sorted(p for p in (run_dir / "adapters").glob("round-[0-9][0-9][0-9]") if p.is_dir())
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no adapters/round-NNN folder (is this a fedrec run directory?)")
    return rounds[-1]


def read_run(run_dir: Path):
    """(catalog, settings) of a run directory, from its config.json and catalog.csv."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json (is this a fedrec run directory?)")
    try:
        config = json.loads(config_path.read_text())["run-config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{config_path}: not a fedrec run config ({e})") from None
    # A run made before a key existed ran with that key's default.
    return read_catalog(run_dir / "catalog.csv"), Settings.from_run_config({**defaults(), **config})


def load_recommender(run_dir: Path, adapter: Path | None = None):
    """(PeftModel, tokenizer, catalog, settings) from a run directory's config and adapter."""
    catalog, s = read_run(run_dir)
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    base = Recommender(encoder, len(catalog), prefix_cache_mb=s.prefix_cache_mb, frozen_precision=s.frozen_precision,
                       **sequence_options(s)).to(device())
    path = adapter or latest_adapter(run_dir)
    try:
        model = PeftModel.from_pretrained(base, str(path))
    except Exception as e:  # safetensors, JSON and shape errors all mean the same thing here
        raise ValueError(f"{path}: not a readable PEFT adapter for this run's model "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    model.eval()
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    return model, tokenizer, catalog, s


def check_request(catalog, history: list[tuple[str, float | None]], k: int) -> None:
    """What the catalog alone can refuse: found before the model loads and encodes the catalog."""
    if not 1 <= k <= len(catalog):
        raise ValueError(f"--top {k}: must be between 1 and the catalog's {len(catalog)} items")
    unknown = [item for item, _ in history if item not in catalog.index]
    if unknown:
        raise ValueError(f"item id(s) not in the catalog: {', '.join(unknown)}")


def recommend(model, tokenizer, catalog, s: Settings, history: list[tuple[str, float | None]], k: int = 10):
    """Top-k (item, score) for a history of (item_id, rating or None), oldest first."""
    check_request(catalog, history, k)
    interactions = [Interaction("you", item, rating, t) for t, (item, rating) in enumerate(history)]
    sequence = tuple(catalog.index[item] for item, _ in history)
    scores = score_users(model, tokenizer, [user_text(interactions, catalog, s.history_len)], s.max_length,
                         sequences=[sequence])[0]
    for item, _ in history:
        scores[catalog.index[item]] = float("-inf")
    top = torch.topk(scores, k)
    return [(catalog.items[i], float(v)) for v, i in zip(top.values, top.indices)]

