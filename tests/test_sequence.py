"""The sequence tower (common/sequence.py) on the real 2-layer model: exact per-example
gradients under Opacus, a neutral start, a DP step that moves it and never a base weight, an
adapter folder PEFT reopens, and scores that depend on the order of a history."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import PeftModel

from client.train import _collate, train
from common.model import (Recommender, adapter_config, build_model, encode_texts, load_encoder,
                          refresh_item_embeddings, score_users, sequence_options)
from common.sequence import PAD, histories
from tests.per_example import checked_per_example_gradients


@pytest.fixture()
def sequence_settings(settings):
    return dataclasses.replace(settings, sequence_length=6, sequence_dim=16, lora_layers=1)


@pytest.fixture()
def sequence_model(movielens, sequence_settings):
    catalog, _ = movielens
    s = sequence_settings
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    model = build_model(encoder, len(catalog), adapter_config(s, encoder), **sequence_options(s))
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    return model, tokenizer


def test_histories_keep_the_most_recent_items_left_padded():
    assert histories([(1, 2, 3), (4,), tuple(range(10))], 4).tolist() == [
        [PAD, 1, 2, 3], [PAD, PAD, PAD, 4], [6, 7, 8, 9]]


def test_the_untrained_tower_adds_nothing(sequence_model, small_split, sequence_settings):
    """δ = 0 at initialisation: round 0 is the text tower and the prior, unchanged."""
    model, tokenizer = sequence_model
    _, _, train_ex, _, _ = small_split
    batch = train_ex[:5]
    texts, sequences = [ex.text for ex in batch], [ex.seen for ex in batch]
    with_tower = score_users(model, tokenizer, texts, sequence_settings.max_length, sequences=sequences)
    recommender = model.get_base_model()
    items = recommender.item_embeddings
    with torch.no_grad():
        text_only = recommender.scorer(encode_texts(model, tokenizer, texts, sequence_settings.max_length) @ items.T)
        assert torch.count_nonzero(recommender.sequence(histories(sequences, 6), items)) == 0
    assert torch.equal(with_tower, text_only.cpu())
    with pytest.raises(ValueError, match="sequence tower"):
        score_users(model, tokenizer, texts, sequence_settings.max_length)


def test_per_example_gradients_of_the_tower_equal_single_example_autograd(sequence_model, small_split,
                                                                         sequence_settings):
    model, tokenizer = sequence_model
    _, _, train_ex, _, _ = small_split
    batch = [ex for ex in train_ex if len(ex.seen) < 6][:3] + [ex for ex in train_ex if len(ex.seen) > 6][:3]
    assert len({min(len(ex.seen), 6) for ex in batch}) > 2  # padded and full histories both
    collate = _collate(model, tokenizer, sequence_settings.max_length, model.get_base_model().item_embeddings.shape[0])
    with torch.no_grad():  # away from the zero start, so every gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    per_example = checked_per_example_gradients(model, collate, batch)
    tower = [n for n in per_example if ".sequence." in n]
    assert any("item_in" in n for n in tower) and any("position" in n for n in tower)
    assert any("qkv" in n for n in tower) and any(n.endswith("out.weight") and "attention" not in n for n in tower)
    for name in tower:
        assert per_example[name][0].abs().max() > 0 and not torch.allclose(per_example[name][0], per_example[name][1])


def test_a_dp_step_moves_the_tower_and_lora_and_never_a_base_weight(sequence_model, small_split, sequence_settings,
                                                                    movielens, tmp_path):
    model, tokenizer = sequence_model
    catalog, _ = movielens
    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(sequence_settings, dp=True, local_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tokenizer, train_ex, s, history=[], seed=0, q=s.batch_size / len(train_ex))
    after = {n: p.detach() for n, p in model.named_parameters()}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".sequence." in n for n in trained) and any("lora_B" in n for n in trained)
    for name in trained:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    base = [n for n in after if "lora_" not in n and "scorer" not in n and ".sequence." not in n]
    assert len(base) > 20
    for name in base:
        assert torch.equal(before[name], after[name]), f"base weight {name} changed"

    # The adapter folder holds the tower; PEFT reopens it onto a fresh base with the same scores.
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_encoder(s.model, s.model_layers)
    reopened = PeftModel.from_pretrained(Recommender(fresh, len(catalog), **sequence_options(s)),
                                         str(tmp_path / "adapter"))
    refresh_item_embeddings(reopened, tokenizer, catalog.texts())
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    texts, sequences = [ex.text for ex in train_ex[:4]], [ex.seen for ex in train_ex[:4]]
    assert torch.allclose(score_users(reopened, tokenizer, texts, s.max_length, sequences=sequences),
                          score_users(model, tokenizer, texts, s.max_length, sequences=sequences), atol=1e-5)


def test_the_trained_tower_reads_the_order_of_a_history(sequence_model, small_split, sequence_settings):
    """After non-private training, the same items in another order score differently: the tower
    models order (the text tower sees only the last history-len items' text)."""
    model, tokenizer = sequence_model
    _, _, train_ex, valid, _ = small_split
    s = dataclasses.replace(sequence_settings, dp=False, local_steps=20, learning_rate=0.05)
    train(model, tokenizer, train_ex, s, history=[], seed=0, q=0.0)
    long = [ex for ex in valid if len(ex.seen) >= 6][:4]
    texts = [ex.text for ex in long]
    forward = score_users(model, tokenizer, texts, s.max_length, sequences=[ex.seen for ex in long])
    shuffled = [ex.seen[:-6] + ex.seen[-6:-1][::-1] + ex.seen[-1:] for ex in long]  # same items, other order
    other = score_users(model, tokenizer, texts, s.max_length, sequences=shuffled)
    assert not torch.allclose(forward, other, atol=1e-4)


def test_recommend_reads_the_tower_from_a_run_directory(sequence_model, sequence_settings, movielens, tmp_path):
    """``fedrec recommend``'s loader rebuilds the tower from the run's config and ranks by it:
    the same top items as the trained model, and a different list when the order changes."""
    import json

    from common.config import defaults
    from common.data import Interaction, user_text, write_catalog
    from common.recommend import load_recommender, recommend

    model, tokenizer = sequence_model
    catalog, _ = movielens
    s = sequence_settings
    with torch.no_grad():  # a tower that is not zero, as after training
        for name, p in model.named_parameters():
            if ".sequence." in name and p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    run = tmp_path / "run"
    model.save_pretrained(run / "adapters" / "round-001")
    write_catalog(catalog, run / "catalog.csv")
    config = {**defaults(), "model-layers": s.model_layers, "lora-layers": s.lora_layers, "history-len": s.history_len,
              "max-length": s.max_length, "sequence-length": s.sequence_length, "sequence-dim": s.sequence_dim}
    (run / "config.json").write_text(json.dumps({"run-config": config}))
    loaded, loaded_tokenizer, _, loaded_settings = load_recommender(run)
    history = [(catalog.items[i].item_id, 4.0) for i in (49, 180, 99, 257, 293)]
    top = [item.item_id for item, _ in recommend(loaded, loaded_tokenizer, catalog, loaded_settings, history)]
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    text = user_text([Interaction("you", i, r, t) for t, (i, r) in enumerate(history)], catalog, s.history_len)
    scores = score_users(model, tokenizer, [text], s.max_length, sequences=[(49, 180, 99, 257, 293)])[0]
    scores[[49, 180, 99, 257, 293]] = float("-inf")
    assert top == [catalog.items[i].item_id for i in torch.topk(scores, 10).indices]
    reordered = history[:3][::-1] + history[3:]  # same last item, so the same text: only the tower sees it
    assert [item.item_id for item, _ in recommend(loaded, loaded_tokenizer, catalog, loaded_settings, reordered)] != top
