"""DP-SGD on the real model: exact per-sample gradients, LoRA-only updates, cumulative ε."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from opacus.accountants import PRVAccountant
from peft import PeftModel

from client.train import _collate, train
from common.model import Recommender, adapter_config, build_model, load_encoder, refresh_item_embeddings
from common.privacy import epsilon, load_history, save_history
from tests.per_example import checked_per_example_gradients


def test_per_sample_gradients_equal_single_example_autograd(model_and_tokenizer, small_split, settings):
    model, tokenizer = model_and_tokenizer
    _, _, train_ex, _, _ = small_split
    batch = train_ex[:6]
    # Different history lengths, so padding, attention masks and seen-item masks are exercised.
    assert len({len(tokenizer(ex.text)["input_ids"]) for ex in batch}) > 1
    collate = _collate(model, tokenizer, settings.max_length, model.get_base_model().item_embeddings.shape[0])
    _, _, seen = collate(batch)
    assert seen.sum(dim=1).tolist() == [len(set(ex.seen)) for ex in batch]
    # PEFT starts lora_B at zero, which makes lora_A's gradient zero; use a trained-like
    # state so that every tensor's gradient is non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    per_sample = checked_per_example_gradients(model, collate, batch)
    assert any("lora_A" in n for n in per_sample) and any("lora_B" in n for n in per_sample)
    assert any("scorer" in n for n in per_sample)
    for name, g in per_sample.items():  # non-trivial and example-specific, so the check has teeth
        assert g[0].abs().max() > 0, name
        assert not torch.allclose(g[0], g[1]), name


@pytest.mark.parametrize("train_a", [True, False])
def test_dp_step_changes_every_lora_tensor_and_no_base_weight(model_and_tokenizer, small_split, settings, train_a):
    """One DP step moves every trained LoRA tensor; base weights stay bit-identical. With
    lora-train-a = false (FFA-LoRA; the default is true) B moves and A stays at its initialisation."""
    model, tokenizer = model_and_tokenizer
    _, _, train_ex, _, _ = small_split
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = dataclasses.replace(settings, dp=True, local_steps=1, lora_train_a=train_a)
    result = train(model, tokenizer, train_ex, s, history=[], seed=0, q=s.batch_size / len(train_ex))
    assert result.steps == 1 and result.epsilon > 0
    after = dict(model.named_parameters())
    layers_times_targets = 2 * len(settings.lora_targets.split(","))
    lora_b = [n for n in after if "lora_B" in n]
    lora_a = [n for n in after if "lora_A" in n]
    assert len(lora_a) == len(lora_b) == layers_times_targets
    trained = [n for n, p in after.items() if p.requires_grad]
    assert set(lora_b) <= set(trained) and (set(lora_a) <= set(trained)) == train_a
    for name in trained:
        assert not torch.equal(before[name], after[name].detach()), f"{name} did not change"
    for name in lora_a if not train_a else []:
        assert torch.equal(before[name], after[name].detach()), f"{name} changed with lora-train-a = false"
    frozen = [n for n, p in after.items() if not p.requires_grad and "lora_" not in n and "scorer" not in n]
    assert len(frozen) > 20
    for name in frozen:
        assert torch.equal(before[name], after[name].detach()), f"base weight {name} changed"


@pytest.mark.parametrize("shape", [(384, 8, 3), (8, 384, 3), (16, 32, 2), (32, 16, 2)],
                         ids=["B-like tokens", "A-like tokens", "rows", "wide rows"])
def test_our_linear_per_sample_gradients_are_opacus_ones(shape):
    """``linear_per_sample_gradients`` computes Opacus' own per-sample gradients of nn.Linear,
    whichever order it multiplies in: tokens (n, t, ·) or rows (n, ·), out > in or not."""
    from opacus.grad_sample.linear import compute_linear_grad_sample

    from client.train import linear_per_sample_gradients

    out_features, in_features, dims = shape
    layer = torch.nn.Linear(in_features, out_features)
    generator = torch.Generator().manual_seed(0)
    lead = (5, 7) if dims == 3 else (5,)
    x = torch.randn(*lead, in_features, generator=generator)
    g = torch.randn(*lead, out_features, generator=generator)
    ours, opacus = linear_per_sample_gradients(layer, x, g), compute_linear_grad_sample(layer, [x], g)
    assert set(ours) == set(opacus) == {layer.weight, layer.bias}
    for p in ours:
        assert ours[p].shape == (5, *p.shape)
        assert torch.allclose(ours[p], opacus[p], rtol=1e-5, atol=1e-6)
    for n in range(5):  # and each is that sample's own gradient
        sample = torch.nn.Linear(in_features, out_features)
        sample.load_state_dict(layer.state_dict())
        (sample(x[n]) * g[n]).sum().backward()
        assert torch.allclose(ours[layer.weight][n], sample.weight.grad, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def plain_opacus(model):
    """Opacus' GradSampleModule as it comes: hooks on every trained module, Opacus' grad samplers."""
    from opacus import GradSampleModule

    module = GradSampleModule(model, loss_reduction="sum")
    try:
        yield module
    finally:
        module.to_standard_module()


def test_a_linear_map_called_twice_in_one_pass_adds_its_per_sample_gradients_as_opacus_does():
    from client.train import per_sample_gradients

    class Twice(torch.nn.Module):  # one map applied to its own output: tied weights
        def __init__(self):
            super().__init__()
            self.map = torch.nn.Linear(6, 6)

        def forward(self, x):
            return self.map(torch.tanh(self.map(x)))

    model = Twice()
    x = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(1))

    def per_sample(context):
        with context as module:
            (module(x) ** 2).sum().backward()
            return {name: p.grad_sample.clone() for name, p in model.named_parameters()}

    opacus = per_sample(plain_opacus(model))
    model.zero_grad(set_to_none=True)
    ours = per_sample(per_sample_gradients(model))
    assert set(ours) == {"map.weight", "map.bias"}
    for name in ours:
        assert ours[name].shape == (4, *dict(model.named_parameters())[name].shape)
        assert torch.allclose(ours[name], opacus[name], rtol=1e-5, atol=1e-6), name


def test_fedrecs_per_sample_gradients_and_dp_steps_are_plain_opacus_ones(movielens, small_split, settings,
                                                                        untrained_catalog_embeddings, monkeypatch):
    """``per_sample_gradients``: LoRA's A and B compute their per-sample gradients in their own
    backward (no Opacus hook, no autograd sum that DPOptimizer would discard), the item scorer by
    Opacus' hooks. The per-sample gradients, and the DP steps made of them, are the ones plain
    Opacus gives, and the model leaves with nn.Linear.forward again and without hooks."""
    from client import train as training
    from tests.conftest import fresh_model

    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(settings, lora_train_a=True)  # A and B both trained
    model, tokenizer = fresh_model(movielens, s)
    model.get_base_model().item_embeddings.copy_(untrained_catalog_embeddings)
    with torch.no_grad():  # LoRA B starts at 0, which makes A's gradient 0
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    collate = _collate(model, tokenizer, s.max_length, len(movielens[0]))
    inputs, targets, seen = collate(train_ex[:8])

    def gradients(context) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        with context(model) as module:
            logits = module(**inputs).masked_fill(seen, float("-inf"))
            torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()
            out = {n: (p.grad_sample.clone(), p.grad) for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    plain = gradients(plain_opacus)
    ours = gradients(training.per_sample_gradients)
    lora = [n for n in plain if "lora_A" in n or "lora_B" in n]
    assert len(lora) == 2 * 2 * len(s.lora_targets.split(","))  # A and B, 2 layers, each target
    assert len(plain) > len(lora)  # the item scorer trains too: Opacus' hooks
    for name, (per_sample, summed) in plain.items():
        assert torch.allclose(ours[name][0], per_sample, rtol=1e-6, atol=1e-8), name
        assert per_sample.abs().max() > 0 and summed is not None, name
        if name in lora:
            assert ours[name][1] is None, f"{name}: autograd still summed its gradient"
        else:  # the item scorer's are not nn.Linear: Opacus' hooks, autograd's sum as before
            assert torch.equal(ours[name][1], summed), name
    assert not any("forward" in vars(m) for m in model.modules())  # nn.Linear.forward again
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())

    def dp_steps_from(state, context) -> dict[str, torch.Tensor]:
        copy = fresh_model(movielens, s)[0]
        copy.load_state_dict(state)
        monkeypatch.setattr(training, "per_sample_gradients", context)
        losses = training.dp_steps(copy, training.adam(copy, s), train_ex, [[i] for i in range(len(train_ex))], None,
                                   collate, dataclasses.replace(s, local_steps=3), 0.5, torch.Generator().manual_seed(7))
        assert len(losses) == 3
        return {n: p.detach() for n, p in copy.named_parameters() if p.requires_grad}

    state = model.state_dict()
    ours = dp_steps_from(state, training.per_sample_gradients)
    theirs = dp_steps_from(state, plain_opacus)
    for name, p in theirs.items():  # the same noise (same generator), the same clipped sums
        assert not torch.equal(p, state[name]), f"{name} did not move"
        assert torch.allclose(ours[name], p, rtol=1e-5, atol=1e-7), name


def test_epsilon_is_cumulative_and_matches_a_fresh_accountant(model_and_tokenizer, small_split, settings, tmp_path):
    model, tokenizer = model_and_tokenizer
    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(settings, dp=True, local_steps=3, noise_multiplier=1.1)
    state = tmp_path / "state"

    round1 = train(model, tokenizer, train_ex, s, load_history(state), seed=1, q=0.01)
    save_history(state, round1.history, s.accountant, s.delta, s.privacy_unit)
    round2 = train(model, tokenizer, train_ex, s, load_history(state), seed=2, q=0.01)
    save_history(state, round2.history, s.accountant, s.delta, s.privacy_unit)

    assert round2.epsilon > round1.epsilon > 0
    assert round1.sample_rate == round2.sample_rate == 0.01
    fresh = PRVAccountant()
    for _ in range(round1.steps + round2.steps):
        fresh.step(noise_multiplier=s.noise_multiplier, sample_rate=0.01)
    assert abs(fresh.get_epsilon(s.delta) - round2.epsilon) <= 1e-6 * round2.epsilon
    # and the persisted history alone reproduces it (what a restarted client would load)
    assert epsilon(load_history(state), s.delta, s.accountant) == round2.epsilon


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_sites_interleaved_releases_cost_what_opacus_says_they_cost(accountant):
    """A site's lifetime alternates DP-SGD, count and evaluation releases; ``epsilon`` hands the
    accountant each mechanism once with its summed steps. Opacus on the history as it was made
    gives the same ε."""
    from opacus.accountants import create_accountant

    from common.privacy import RDP_ORDERS

    history = [(10.0, 1.0, 1)] + [(1.0, 0.0118, 10), (50.0, 1.0, 1), (100.0, 1.0, 1)] * 12
    opacus = create_accountant(accountant)
    opacus.history = list(history)
    expected = opacus.get_epsilon(1e-5, **({"alphas": RDP_ORDERS} if accountant == "rdp" else {}))
    assert epsilon(history, 1e-5, accountant) == pytest.approx(expected, rel=1e-9)
    assert epsilon(history, 1e-5, accountant) > epsilon(history[:-3], 1e-5, accountant)


def test_the_auditor_replays_a_servers_round_by_round_releases_as_they_were_made():
    """The server's ledger holds one central release a round. The auditor merges equal
    mechanisms before accounting (so 30 rounds cost it one entry, not 30): Opacus' RDP on the
    history as it was made, round by round, gives the same ε, and one more round costs more."""
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
    from opacus.accountants import RDPAccountant

    from audit.accountant import audit_epsilon

    history = ((4.0, 1.0, 1),) + ((0.9986, 94 / 943, 1),) * 30
    opacus = RDPAccountant()
    opacus.history = list(history)
    expected = opacus.get_epsilon(1e-5, alphas=list(DEFAULT_RDP_ORDERS))
    assert audit_epsilon(history, 1e-5, "flwr-rdp") == pytest.approx(expected, rel=1e-9)
    assert audit_epsilon(history + history[-1:], 1e-5, "flwr-rdp") > audit_epsilon(history, 1e-5, "flwr-rdp")


def test_dp_noise_is_not_replayable_from_the_run_seed(model_and_tokenizer, small_split, settings):
    """Same seed, same data, same start: two DP steps must differ (secret noise and sampling)."""
    model, tokenizer = model_and_tokenizer
    _, _, train_ex, _, _ = small_split
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    s = dataclasses.replace(settings, dp=True, local_steps=1)
    outcomes = []
    for _ in range(2):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        train(model, tokenizer, train_ex, s, history=[], seed=123, q=s.batch_size / len(train_ex))
        outcomes.append({n: p.detach().clone() for n, p in model.named_parameters() if n in start})
    assert any(not torch.equal(outcomes[0][n], outcomes[1][n]) for n in start)


def test_the_sample_rate_is_public_whatever_the_data_size(model_and_tokenizer, small_split, settings):
    """q comes from the caller (batch-size / declared-examples), never from len(examples): two
    sites of 93 and 40 examples sampled at the same q account the same (σ, q, steps). At q =
    1/93 a Poisson batch of 93 is empty with probability (92/93)^93 ≈ 0.37, so 16 steps meet an
    empty one (noise only) with probability > 0.999: they must not crash."""
    model, tokenizer = model_and_tokenizer
    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(settings, dp=True, local_steps=16, batch_size=1, noise_multiplier=1.0)
    results = [train(model, tokenizer, train_ex[:n], s, history=[(10.0, 1.0, 1)], seed=0, q=1 / 93) for n in (93, 40)]
    for result in results:
        assert result.sample_rate == 1 / 93 and result.steps == 16
        assert result.history == [(10.0, 1.0, 1), (1.0, 1 / 93, 16)]
        assert result.epsilon == epsilon([(10.0, 1.0, 1), (1.0, 1 / 93, 16)], s.delta, s.accountant)


def test_lora_on_the_top_layers_only(movielens, small_split, settings, tmp_path, untrained_catalog_embeddings):
    """lora-layers = 1 on the 2-layer encoder: LoRA sits in layer 1 alone (the gradient stops
    there); one DP step moves all of it and no base weight; the saved adapter folder opens
    with PEFT onto the same tensors. Untrained, it encodes the catalog as the shared fixture's
    model with LoRA in both layers does (B = 0: the adapter adds nothing yet)."""
    catalog, _ = movielens
    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(settings, dp=True, local_steps=1, lora_layers=1)
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    # float32 products, as the fixture's model computes (LoRA in both layers: nothing to cache)
    model = build_model(encoder, len(catalog), adapter_config(s, encoder), frozen_precision="float32")
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    torch.testing.assert_close(model.get_base_model().item_embeddings, untrained_catalog_embeddings, rtol=0, atol=1e-5)
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * len(s.lora_targets.split(","))  # A and B, per target, one layer
    assert all(".layer.1." in n for n in lora), lora
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, tokenizer, train_ex, s, history=[], seed=0, q=s.batch_size / len(train_ex))
    after = {n: p.detach() for n, p in model.named_parameters()}
    for name in lora:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    base = [n for n in after if "lora_" not in n and "scorer" not in n]
    assert any(".layer.0." in n for n in base)
    for name in base:
        assert torch.equal(before[name], after[name]), f"base weight {name} changed"

    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_encoder(s.model, s.model_layers)
    reopened = PeftModel.from_pretrained(Recommender(fresh, len(catalog)), str(tmp_path / "adapter"))
    reopened_lora = {n: p for n, p in reopened.named_parameters() if "lora_" in n}
    assert sorted(reopened_lora) == sorted(lora)
    assert all(torch.equal(reopened_lora[n].detach(), after[n]) for n in lora)


def test_a_crash_between_the_charge_and_the_log_loses_no_line(tmp_path):
    """A node killed after its accountant's atomic write and before the log's append (the state
    the run killed mid-round in tests/test_resume.py once left): the site's audit still sees
    every release, the next release appends the missing lines first, and a line removed from
    the log otherwise is still a finding."""
    import json

    from audit.site import site_audit

    site = tmp_path / "site"
    state = site / "state"

    def release(history: list, phase: str, *mechanisms: tuple) -> list:
        history = history + [m[1:] for m in mechanisms]
        save_history(state, history, "prv", 1e-5, "example", [
            {"run": "run-a", "flower-run": 1, "round": len(history), "phase": phase, "mechanism": m[0],
             "noise_multiplier": m[1], "sample_rate": m[2], "steps": m[3], "sensitivity": 1.0} for m in mechanisms])
        return history

    history = release([], "prior", ("gaussian-histogram", 5.0, 1.0, 1))
    history = release(history, "train", ("dp-sgd", 1.0, 0.01, 40), ("gaussian-count", 50.0, 1.0, 1))
    log = state / "releases.jsonl"
    whole = log.read_text().splitlines(keepends=True)
    assert [json.loads(line)["index"] for line in whole] == [0, 1, 2]
    log.write_text(whole[0])  # the kill: round 1's two lines never reached the log

    assert site_audit(site)["findings"] == []  # they are in the accountant, written with the charge
    release(history, "evaluate", ("gaussian-eval-sums", 20.0, 1.0, 1))
    lines = log.read_text().splitlines(keepends=True)
    assert lines[:3] == whole and [json.loads(line)["index"] for line in lines] == [0, 1, 2, 3]
    assert site_audit(site)["findings"] == []

    log.write_text("".join(lines[:1] + lines[2:]))  # an earlier release's line removed
    assert [f["kind"] for f in site_audit(site)["findings"]] == ["unlogged"]
