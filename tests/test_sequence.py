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
from common.sequence import PAD, SequenceTower, histories
from client.train import user_windows
from tests.per_example import checked_per_example_gradients


@pytest.fixture()
def sequence_model(movielens, sequence_settings, untrained_catalog_embeddings):
    catalog, _ = movielens
    s = sequence_settings
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    # float32 products: per-example gradients are compared with single-example autograd to 1e-4,
    # and bfloat16's rounding of a product (about 0.4 %) would show through at that tolerance
    model = build_model(encoder, len(catalog), adapter_config(s, encoder), frozen_precision="float32",
                        **sequence_options(s))
    model.get_base_model().item_embeddings.copy_(untrained_catalog_embeddings)  # what a refresh sets (conftest)
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
    reopened = PeftModel.from_pretrained(Recommender(fresh, len(catalog), frozen_precision="float32",
                                                     **sequence_options(s)), str(tmp_path / "adapter"))
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
    s = dataclasses.replace(sequence_settings, dp=False, local_steps=20, learning_rate=0.003)
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


# ---- sequence training: one sample per user sequence, every position predicted ----

def test_a_users_windows_predict_each_of_their_items_once_from_its_past(small_split):
    _, _, train_ex, _, _ = small_split
    windows, units = user_windows(train_ex, 6)
    users = list(dict.fromkeys(ex.user for ex in train_ex))
    assert len(units) == len(users) == 12 and sorted(i for unit in units for i in unit) == list(range(len(windows)))
    for user, unit in zip(users, units):
        examples = [ex for ex in train_ex if ex.user == user]
        sequence = max(examples, key=lambda ex: len(ex.seen)).seen + (examples[-1].target,)
        predicted = []
        for i in unit:
            w = windows[i]
            assert 2 <= len(w.items) <= 7 and sequence[:len(w.before) + len(w.items)] == w.before + w.items
            predicted += list(range(len(w.before) + 1, len(w.before) + len(w.items)))
        assert sorted(predicted) == list(range(1, len(sequence)))  # every item but the first, once
        assert len(unit) > 1 or len(sequence) <= 7


def test_every_slot_of_a_window_predicts_as_its_prefix_alone(sequence_training_model, small_split):
    """Causal attention, positions from the oldest item: slot t's scores equal the scores of the
    history that ends there, however it is padded, so training predicts as scoring does."""
    model, tokenizer, s = sequence_training_model
    _, _, train_ex, _, _ = small_split
    windows, _ = user_windows(train_ex, s.sequence_length)
    window = next(w for w in windows if len(w.items) == s.sequence_length + 1)
    short = next(w for w in windows if len(w.items) < s.sequence_length)
    recommender = model.get_base_model()
    recommender.eval()
    for w in (window, short):
        inputs = w.items[:-1]
        with torch.no_grad():
            every_slot = recommender(history=histories([inputs], s.sequence_length))[0]
        for t in range(len(inputs)):
            alone = score_users(model, tokenizer, ["unused"], s.max_length, sequences=[inputs[:t + 1]])[0]
            slot = s.sequence_length - len(inputs) + t
            assert torch.allclose(every_slot[slot], alone, atol=1e-5), (len(inputs), t)


@pytest.mark.parametrize("sequence_training_model", [0, 24], indirect=True, ids=["whole", "projected"])
def test_a_users_sequence_gradient_is_the_mean_over_its_positions_and_clips_as_one(sequence_training_model,
                                                                                   small_split, movielens):
    """The per-sample rows, summed per user, equal autograd on that user's windows alone:
    ∇ (1/k_u) Σ over the user's k_u predicted positions of ℓ. So clipping a row clips a user."""
    from client.train import _collate_windows, adam, capped_rows, per_sample_gradients, position_losses, unit_gradients
    from tests.per_example import ATOL, RTOL

    model, tokenizer, s = sequence_training_model
    s = dataclasses.replace(s, bias_learning_rate=0.01)  # the item bias too: its rows sum over positions
    catalog, _ = movielens
    _, _, train_ex, _, _ = small_split
    windows, units = user_windows(train_ex, s.sequence_length)
    by_windows = sorted(units, key=len)
    sampled = [by_windows[0], by_windows[len(units) // 2], by_windows[-1]]
    assert len({len(unit) for unit in sampled}) == 3  # users of different lengths: 1/k_u matters
    rows, owner = capped_rows(sampled, None, torch.Generator())
    collate = _collate_windows(model, len(catalog))
    adam(model, s)  # marks what trains, as local training does
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("scorer.modules_to_save.default.bias") for n in trainable)
    assert all(".sequence." in n or n.endswith("bias") for n in trainable)  # no LoRA, no scale: no text tower

    def alone(unit):
        model.zero_grad(set_to_none=True)
        inputs, targets, seen = collate([windows[i] for i in unit])
        losses, predicted = position_losses(model(**inputs), targets, seen)
        (losses.sum() / predicted.sum()).backward()
        return {n: p.grad.detach().clone() for n, p in trainable.items()}

    expected = [alone(unit) for unit in sampled]
    model.zero_grad(set_to_none=True)
    with per_sample_gradients(model) as module:
        unit_gradients(module, collate([windows[i] for i in rows]), owner, 3)
        for name, p in trainable.items():
            for k in range(3):
                assert torch.allclose(p.grad_sample[k], expected[k][name], rtol=RTOL, atol=ATOL), (name, k)


@pytest.mark.parametrize("sequence_training_model", [0, 24], indirect=True, ids=["whole", "projected"])
def test_a_user_level_sequence_step_moves_the_tower_and_nothing_else(sequence_training_model, small_split):
    model, tokenizer, s = sequence_training_model
    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(s, dp=True, local_steps=1, batch_size=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, tokenizer, train_ex, s, history=[], seed=0, q=0.5)
    assert result.history == [(s.noise_multiplier, 0.5, 1)]
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    tower = {n for n in before if ".sequence." in n and "modules_to_save" in n}
    assert tower and moved == tower  # LoRA, the score scale, the frozen bias and every base weight stay


@pytest.mark.parametrize("overrides, message", [
    ({"sequence-training": True}, "set sequence-length > 0"),
    ({"sequence-training": True, "sequence-length": 20}, "set privacy-unit = user"),
    ({"sequence-dropout": 1.0}, "sequence-dropout must be in"),
    ({"sequence-length": 20, "sequence-projection": 64}, "set sequence-training = true"),
])
def test_sequence_training_settings_name_what_to_change(overrides, message):
    from common.config import ConfigError, Settings, defaults

    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config({**defaults(), **overrides})


def test_an_untrained_sequence_model_scores_by_the_last_items_text_and_the_prior(sequence_training_model, small_split):
    """Trained on sequences, the user is their last item's catalog embedding: with the tower at
    zero, score = s · cos(e_last, e_item) + b_item, the frozen encoder's similarity and the prior."""
    model, tokenizer, s = sequence_training_model
    _, _, _, valid, _ = small_split
    recommender = model.get_base_model()
    with torch.no_grad():
        recommender.sequence.modules_to_save["default"].out.weight.zero_()
    sequences = [ex.seen for ex in valid[:5]]
    items = recommender.item_embeddings
    expected = recommender.scorer(items[[seq[-1] for seq in sequences]] @ items.T)
    assert torch.equal(score_users(model, tokenizer, [""] * 5, s.max_length, sequences=sequences), expected.detach())
    with pytest.raises(ValueError, match="sequence-training"):
        score_users(model, tokenizer, [""] * 5, s.max_length)


@pytest.mark.parametrize("sequence_training_model", [24], indirect=True)
def test_the_projection_is_the_catalogs_principal_directions_whoever_fits_it(sequence_training_model, movielens,
                                                                             untrained_catalog_embeddings):
    """P is a function of the public catalog alone: orthonormal, the directions of largest
    variance in order, the same in every copy PEFT keeps of the tower and in a model built with
    another seed (so sites and server agree without sending it), and refitted by a refresh."""
    model, _, s = sequence_training_model
    towers = [m for m in model.modules() if isinstance(m, SequenceTower)]
    assert len(towers) == 2  # PEFT's original module and the trained copy
    basis = towers[0].basis.clone()
    assert basis.shape == (384, 24) and torch.equal(towers[1].basis, basis)
    assert torch.allclose(basis.T @ basis, torch.eye(24), atol=1e-5)
    centred = untrained_catalog_embeddings - untrained_catalog_embeddings.mean(dim=0)
    variances = (centred @ basis).var(dim=0)
    assert torch.all(variances[:-1] >= variances[1:])
    rest = centred - centred @ basis @ basis.T  # what P leaves out: less variance than its last direction
    assert (rest @ torch.linalg.svd(rest, full_matrices=False).Vh[0]).var() <= variances[-1] + 1e-6
    encoder, _ = load_encoder(s.model, s.model_layers)
    other = build_model(encoder, len(movielens[0]), adapter_config(s, encoder), seed=7, **sequence_options(s))
    other.get_base_model().set_item_embeddings(untrained_catalog_embeddings)
    assert torch.equal(other.get_base_model().sequence.modules_to_save["default"].basis, basis)
    model.get_base_model().set_item_embeddings(untrained_catalog_embeddings.flip(1))  # another catalog, another P
    assert not torch.allclose(towers[1].basis, basis)


def test_a_projected_tower_trains_fewer_numbers():
    """The adaptor's first layer and W_out read and write k numbers per item instead of 384."""
    def trained(projection):
        tower = SequenceTower(384, 50, 32, projection=projection)
        return sum(p.numel() for p in tower.parameters())
    assert trained(0) - trained(64) == (384 - 64) * (4 * 32 + 32)
    with pytest.raises(ValueError, match="sequence-projection: 500 is not in 0..384"):
        trained(500)
