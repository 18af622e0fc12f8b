"""Frozen-prefix caching is exact: the same logits, per-sample gradients and catalog embeddings
as running the whole encoder, on the real model (2 layers, LoRA on the top one)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from client.train import _collate, per_sample_gradients
from common.model import adapter_config, build_model, encode_texts, frozen_dtype, load_encoder
from common.prefix_cache import PrefixCache, can_run_unpadded, frozen_linear

EXACT = {"rtol": 1e-5, "atol": 1e-5}


def model_pair(settings, num_items, lora_layers=1, prefix_cache_mb=1024, frozen_precision="float32"):
    """float32 products by default: the exactness tests compare with the whole encoder and the padded
    layers, which compute in float32."""
    s = dataclasses.replace(settings, lora_layers=lora_layers, lora_train_a=True)
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    model = build_model(encoder, num_items, adapter_config(s, encoder), prefix_cache_mb=prefix_cache_mb,
                        frozen_precision=frozen_precision)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0: perturb, so that every gradient is non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        model.get_base_model().item_embeddings.normal_()
    return model, tokenizer


def per_sample(model, inputs, targets, seen):
    model.train()
    with per_sample_gradients(model) as module:
        logits = module(**inputs).masked_fill(seen, float("-inf"))
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
        grads = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def test_cached_logits_and_per_sample_gradients_equal_the_whole_encoders(movielens, small_split, settings):
    catalog, _ = movielens
    _, _, train_ex, _, _ = small_split
    batch = train_ex[:8]
    model, tokenizer = model_pair(settings, len(catalog))
    recommender = model.get_base_model()
    collate = _collate(model, tokenizer, settings.max_length, len(catalog))
    cached_inputs, targets, seen = collate(batch)
    assert set(cached_inputs) == {"prefix_states", "attention_mask"}
    assert recommender.prefix_cache.layers == 1  # layer 0 carries no LoRA: it is the cached prefix
    lengths = cached_inputs["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # padding is exercised

    enc = tokenizer([ex.text for ex in batch], padding=True, truncation=True, max_length=settings.max_length,
                    return_tensors="pt")
    token_inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    logits_cached, grads_cached = per_sample(model, cached_inputs, targets, seen)
    logits_whole, grads_whole = per_sample(model, token_inputs, targets, seen)
    finite = torch.isfinite(logits_whole)
    assert torch.allclose(logits_cached[finite], logits_whole[finite], **EXACT)
    assert grads_cached.keys() == grads_whole.keys() and any("lora_A" in n for n in grads_cached)
    for name in grads_whole:
        assert grads_whole[name].abs().max() > 0, name
        assert torch.allclose(grads_cached[name], grads_whole[name], **EXACT), (
            f"{name}: max |Δ| {(grads_cached[name] - grads_whole[name]).abs().max():.2e}")
    # A second pass is served from the cache and is bit-identical.
    misses = recommender.prefix_cache.misses
    again, _, _ = collate(batch)
    assert recommender.prefix_cache.misses == misses and torch.equal(again["prefix_states"], cached_inputs["prefix_states"])


def test_the_adapted_layers_skip_padding_exactly(movielens, small_split, settings):
    """Two adapted layers stacked above a cached one, LoRA on every kind of linear map in them
    (attention's projections and output, both feed-forward maps): run on the real tokens only,
    they give the padded layers' logits and per-sample gradients."""
    catalog, _ = movielens
    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(settings, model_layers=3, lora_targets="query,key,value,dense")
    model, tokenizer = model_pair(s, len(catalog), lora_layers=2)
    recommender = model.get_base_model()
    inputs, targets, seen = _collate(model, tokenizer, s.max_length, len(catalog))(train_ex[:8])
    top = recommender.encoder.encoder.layer[recommender.prefix_cache.layers:]
    assert len(top) == 2 and can_run_unpadded(top)
    lengths = inputs["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()
    unpadded = per_sample(model, inputs, targets, seen)
    recommender.unpadded = False
    padded = per_sample(model, inputs, targets, seen)
    finite = torch.isfinite(padded[0])
    assert torch.allclose(unpadded[0][finite], padded[0][finite], **EXACT)
    assert unpadded[1].keys() == padded[1].keys() and sum("lora_A" in n for n in padded[1]) == 2 * 6
    for name, grad in padded[1].items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(unpadded[1][name], grad, **EXACT), f"{name}: max |Δ| {(unpadded[1][name] - grad).abs().max():.2e}"


def test_bfloat16_frozen_products_are_float32s_to_bfloat16_rounding(movielens, small_split, settings):
    """frozen-precision = bfloat16 on a real frozen map (the top layer's feed-forward input map,
    on real cached states): with u = 2⁻⁸, bfloat16's unit roundoff, rounding x and W costs at most
    (2u + u²)·Σ|x_k·w_k|, the bias u·|b|, and the bfloat16 output u·|y|; the sum is accumulated in
    float32. Every output keeps within that bound, and the products are not float32's."""
    catalog, _ = movielens
    _, _, train_ex, _, _ = small_split
    model, tokenizer = model_pair(settings, len(catalog), frozen_precision="bfloat16")
    inputs, _, _ = _collate(model, tokenizer, settings.max_length, len(catalog))(train_ex[:8])
    tokens = inputs["prefix_states"][inputs["attention_mask"].bool()]
    dense = model.get_base_model().encoder.encoder.layer[-1].intermediate.dense
    exact = dense(tokens)
    low = frozen_linear(dense, tokens, torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == exact.shape
    u = 2.0 ** -8
    scale = tokens.abs() @ dense.weight.abs().T
    bound = (2 * u + u * u) * scale + u * dense.bias.abs() + u * low.abs() + 1e-6 * (scale + dense.bias.abs())
    assert ((low - exact).abs() <= bound).all()
    assert (low - exact).abs().max() > 0  # computed in bfloat16, not float32


def test_bfloat16_frozen_products_train_lora_only_as_float32_does(movielens, small_split, settings):
    """With bfloat16 frozen products a DP step's per-sample gradients reach every LoRA tensor
    and no base weight, and point where float32's do: per sample and tensor, cosine ≥ 0.999 (one
    bfloat16 rounding, about 0.4 %, per product on the way)."""
    catalog, _ = movielens
    _, _, train_ex, _, _ = small_split
    grads = {}
    for precision in ("float32", "bfloat16"):
        model, tokenizer = model_pair(settings, len(catalog), frozen_precision=precision)
        inputs, targets, seen = _collate(model, tokenizer, settings.max_length, len(catalog))(train_ex[:8])
        _, grads[precision] = per_sample(model, inputs, targets, seen)
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert grads["float32"].keys() == grads["bfloat16"].keys() and any("lora_A" in n for n in grads["float32"])
    for name, exact in grads["float32"].items():
        low, exact = grads["bfloat16"][name].reshape(len(exact), -1), exact.reshape(len(exact), -1)
        assert (low.abs().max(1).values > 0).all(), name  # every sample's gradient reaches it
        cosine = torch.nn.functional.cosine_similarity(low, exact, dim=1)
        assert (cosine >= 0.999).all(), f"{name}: cosine {cosine.min():.5f}"


def test_with_bfloat16_products_each_examples_gradient_is_its_own_to_bfloat16_rounding(movielens, small_split,
                                                                                        settings):
    """The per-sample exactness of DESIGN.md in the default precision: Opacus' per-sample
    gradient of each of 16 examples (texts of different lengths in one batch) is autograd's on
    that example alone to half a bfloat16 rounding, 2⁻⁹ of its norm (4e-4 measured; float32
    reaches 5e-6). Other examples only move it through rounding: a tiny float32 difference can
    flip an input's rounding to bfloat16."""
    catalog, _ = movielens
    _, _, train_ex, _, _ = small_split
    model, tokenizer = model_pair(settings, len(catalog), frozen_precision="bfloat16")
    collate = _collate(model, tokenizer, settings.max_length, len(catalog))
    batch = train_ex[:16]
    assert len({len(ex.text) for ex in batch}) > 8
    inputs, targets, seen = collate(batch)
    _, per_example = per_sample(model, inputs, targets, seen)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for i, example in enumerate(batch):
        inputs, targets, seen = collate([example])
        logits = model(**inputs).masked_fill(seen, float("-inf"))
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
        alone = torch.cat([p.grad.flatten() for p in trained.values()])
        in_batch = torch.cat([per_example[n][i].flatten() for n in trained])
        model.zero_grad(set_to_none=True)
        assert (in_batch - alone).norm() <= 2.0 ** -9 * alone.norm(), f"example {i}"


def test_auto_precision_is_bfloat16_where_the_cpu_multiplies_it():
    """``auto``: bfloat16 on a CPU whose flags (Linux' /proc/cpuinfo) list AVX512-BF16 or
    AMX-BF16, float32 elsewhere; an explicit choice is kept."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    cpu = torch.device("cpu")
    assert frozen_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert frozen_dtype("float32", cpu) == torch.float32 and frozen_dtype("bfloat16", cpu) == torch.bfloat16


def test_cached_catalog_embeddings_equal_uncached_and_respect_the_memory_bound(movielens, settings):
    catalog, _ = movielens
    texts = catalog.texts()[:200]
    cached, tokenizer = model_pair(settings, len(catalog))
    uncached, _ = model_pair(settings, len(catalog), prefix_cache_mb=0)
    uncached.load_state_dict(cached.state_dict())
    a = encode_texts(cached, tokenizer, texts, 48)
    b = encode_texts(uncached, tokenizer, texts, 48)
    assert uncached.get_base_model().prefix_cache is None
    assert torch.allclose(a, b, **EXACT)
    cache = cached.get_base_model().prefix_cache
    assert cache.misses == len(set(texts)) and len(cache.states) == len(set(texts))

    small = PrefixCache(cache.encoder, tokenizer, cache.layers, max_bytes=cache.bytes // 4)
    states = small.lookup(texts, 48)
    assert 0 < small.bytes <= small.max_bytes and len(small.states) < len(texts)  # the oldest were evicted
    assert all(torch.allclose(x, cache.states[(t, 48)], **EXACT) for x, t in zip(states, texts))


def test_the_cache_is_off_when_lora_reaches_the_first_layer(movielens, settings):
    catalog, _ = movielens
    model, tokenizer = model_pair(settings, len(catalog), lora_layers=0)
    encode_texts(model, tokenizer, catalog.texts()[:5], 48)
    assert model.get_base_model().prefix_cache is None and model.get_base_model().prefix_cache_bytes == 0


def test_a_new_process_reads_the_catalogs_states_from_disk(movielens, settings, tmp_path):
    catalog, _ = movielens
    texts = catalog.texts()[:50]
    model, tokenizer = model_pair(settings, len(catalog))
    cache = PrefixCache(model.get_base_model().encoder, tokenizer, 1, 1 << 30)
    path = tmp_path / "catalog.pt"
    cache.load_or_compute(texts, 48, path)
    assert path.is_file() and cache.misses == len(texts)
    fresh = PrefixCache(cache.encoder, tokenizer, cache.layers, 1 << 30)
    fresh.load_or_compute(texts, 48, path)
    assert fresh.misses == 0 and all(torch.equal(fresh.states[(t, 48)], cache.states[(t, 48)]) for t in texts)
    held = fresh.bytes
    fresh.load_or_compute(texts, 48, path)  # read again into a cache that holds them: counted once
    assert fresh.bytes == held == sum(x.numel() * x.element_size() for x in fresh.states.values())


def test_a_sites_users_texts_are_kept_on_disk_apart_from_the_catalog(movielens, settings, tmp_path):
    """A deployed site's next process starts with the users' texts' states this one computed;
    the catalog's are excluded (kept in their own file); a file of another depth, or a damaged
    one, is ignored."""
    catalog, _ = movielens
    items = catalog.texts()[:3]
    users = ["Toy Story (1995). Animation. Rated 5/5", "Heat (1995). Action. Rated 3/5"]
    model, tokenizer = model_pair(settings, len(catalog))
    path = tmp_path / "texts.pt"
    cache = PrefixCache(model.get_base_model().encoder, tokenizer, 1, 1 << 30)
    cache.keep_on_disk(path, set(items))
    cache.lookup(users + items, 64)
    cache.save_new()
    nxt = PrefixCache(cache.encoder, tokenizer, 1, 1 << 30)
    nxt.keep_on_disk(path, set(items))
    assert set(nxt.states) == {(t, 64) for t in users}
    assert all(torch.equal(nxt.states[key], cache.states[key]) for key in nxt.states)
    nxt.lookup(users, 64)
    assert nxt.misses == 0
    deeper = PrefixCache(cache.encoder, tokenizer, 2, 1 << 30)
    deeper.keep_on_disk(path, set(items))
    assert not deeper.states
    path.write_bytes(b"damaged")
    damaged = PrefixCache(cache.encoder, tokenizer, 1, 1 << 30)
    damaged.keep_on_disk(path, set(items))
    assert not damaged.states and torch.equal(damaged.lookup(users[:1], 64)[0], cache.states[(users[0], 64)])


def test_training_and_evaluation_with_the_cache_replay_those_without_it(movielens, small_split, settings):
    """Non-private training is reproducible from its seed: the same steps with the cache on and
    off end at the same adapter and the same full-ranking ranks."""
    from client.train import ranks, train
    from common.model import adapter_state, refresh_item_embeddings

    catalog, _ = movielens
    _, _, train_ex, valid, _ = small_split
    s = dataclasses.replace(settings, dp=False, local_steps=6, lora_layers=1, learning_rate=0.01)
    results = []
    for cache_mb in (1024, 0):
        model, tokenizer = model_pair(s, len(catalog), prefix_cache_mb=cache_mb)
        refresh_item_embeddings(model, tokenizer, catalog.texts())
        train(model, tokenizer, train_ex, s, [], seed=3, q=0.0)
        refresh_item_embeddings(model, tokenizer, catalog.texts())
        results.append((adapter_state(model), ranks(model, tokenizer, valid, s.max_length)))
        assert (model.get_base_model().prefix_cache is None) == (cache_mb == 0)
    (cached, cached_ranks), (whole, whole_ranks) = results
    moved = model_pair(s, len(catalog))[0]
    assert any(not torch.allclose(whole[k], v.cpu()) for k, v in adapter_state(moved).items())  # training moved it
    for key in whole:
        assert torch.allclose(cached[key], whole[key], rtol=1e-4, atol=1e-5), key
    assert torch.equal(cached_ranks, whole_ranks)
