"""User-level DP-SGD on the real model: a user's gradient is clipped as one, exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from opacus.optimizers import DPOptimizer

from audit.accountant import audit_epsilon, tolerance
from client.train import _collate, capped_rows, per_sample_gradients, privacy_units, train, unit_gradients
from common.metrics import unit_histogram
from common.privacy import (Budget, epsilon, history_unit, public_sample_rate, save_history,
                            unit_conflict)

RTOL, ATOL = 1e-3, 1e-5  # Opacus' per-sample gradients against autograd: float32 round-off


def perturbed(model):
    """PEFT starts lora_B at zero, which makes lora_A's gradient zero: a trained-like state."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.train()
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def mean_loss_gradient(model, collate, rows) -> dict[str, torch.Tensor]:
    """Autograd on one user's rows alone: ∇ (1/k) Σ_i ℓ_i."""
    model.zero_grad(set_to_none=True)
    inputs, targets, seen = collate(rows)
    logits = model(**inputs).masked_fill(seen, float("-inf"))
    torch.nn.functional.cross_entropy(logits, targets, reduction="mean").backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cap", [3, 1])  # 1: a row per unit, whose per-row gradients are the units' as they are
def test_a_users_clipped_contribution_is_the_clip_of_its_own_gradient(model_and_tokenizer, small_split, settings, cap):
    """One noiseless DP step over three sampled users: the summed gradient equals
    Σ_u clip_C(∇ mean loss of u's capped examples, computed alone) / batch-size."""
    model, tokenizer = model_and_tokenizer
    _, _, train_ex, _, _ = small_split
    trainable = perturbed(model)
    units = privacy_units(train_ex, "user")
    assert all(len({train_ex[i].user for i in unit}) == 1 for unit in units) and len(units) == 12
    sampled = [units[0], units[3], units[7]]
    rows, owner = capped_rows(sampled, cap=cap, generator=torch.Generator().manual_seed(1))
    assert owner.tolist() == [u for u in range(3) for _ in range(cap)]  # every one of them has more than 3 examples
    assert all(r in unit for r, u in zip(rows, owner.tolist()) for unit in [sampled[u]])
    collate = _collate(model, tokenizer, settings.max_length, model.get_base_model().item_embeddings.shape[0])
    by_user = [[train_ex[r] for r, u in zip(rows, owner.tolist()) if u == k] for k in range(3)]
    alone = [mean_loss_gradient(model, collate, user_rows) for user_rows in by_user]
    norms = [torch.cat([g.flatten() for g in a.values()]).norm() for a in alone]
    clip = float(sorted(norms)[1])  # one user above C, one at it, one below: clipping has teeth

    model.zero_grad(set_to_none=True)
    optimizer = DPOptimizer(torch.optim.SGD(list(trainable.values()), lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=clip, expected_batch_size=4, loss_reduction="mean")
    with per_sample_gradients(model) as module:
        unit_gradients(module, collate([train_ex[r] for r in rows]), owner, 3)
        for name, p in trainable.items():  # before clipping: each row is its user's gradient alone
            for k in range(3):
                assert torch.allclose(p.grad_sample[k], alone[k][name], rtol=RTOL, atol=ATOL), (name, k)
        optimizer.step()
    for name, p in trainable.items():
        expected = sum(a[name] * min(1.0, clip / float(n)) for a, n in zip(alone, norms)) / 4
        assert torch.allclose(p.grad, expected, rtol=RTOL, atol=ATOL), name
    assert min(norms) < clip < max(norms)


def test_users_not_sampled_contribute_nothing_and_the_cap_holds(small_split):
    _, _, train_ex, _, _ = small_split
    units = privacy_units(train_ex, "user")
    generator = torch.Generator().manual_seed(0)
    rows, owner = capped_rows([units[2], units[5]], cap=4, generator=generator)
    assert {train_ex[r].user for r in rows} == {train_ex[units[2][0]].user, train_ex[units[5][0]].user}
    assert torch.bincount(owner).tolist() == [4, 4] and len(set(rows)) == 8
    assert capped_rows([], cap=4, generator=generator)[0] == []  # an empty sample: the noise alone
    small = [units[0][:2]]
    assert capped_rows(small, cap=4, generator=generator)[0] == units[0][:2]  # under the cap: all of them
    assert privacy_units(train_ex, "example") == [[i] for i in range(len(train_ex))]


def test_a_user_level_dp_step_changes_lora_and_never_the_base(model_and_tokenizer, small_split, settings):
    model, tokenizer = model_and_tokenizer
    _, _, train_ex, _, _ = small_split
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = dataclasses.replace(settings, dp=True, privacy_unit="user", batch_size=4, examples_per_user=3, local_steps=2)
    q = public_sample_rate(s.batch_size, Budget(8.0, 1e-5, declared_users=12), "user")
    result = train(model, tokenizer, train_ex, s, history=[], seed=0, q=q)
    assert result.history == [(s.noise_multiplier, 4 / 12, 2)]
    after = dict(model.named_parameters())
    trained = [n for n, p in after.items() if p.requires_grad]
    assert any("lora_B" in n for n in trained) and all("lora_" in n for n in trained)
    for name in trained:
        assert not torch.equal(before[name], after[name].detach()), f"{name} did not change"
    frozen = [n for n, p in after.items() if not p.requires_grad and "lora_" not in n and "scorer" not in n]
    assert len(frozen) > 20
    for name in frozen:
        assert torch.equal(before[name], after[name].detach()), f"base weight {name} changed"


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_user_level_epsilon_matches_dp_accounting(accountant):
    """Opacus' accountant against Google's dp-accounting (PLD for PRV, RDP for RDP) on a site's
    user-level history: the prior at σ_h = 2, 50 steps at q_u = 32/94, 5 counts and 6 evaluations."""
    history = [(2.0, 1.0, 1), (2.0, 32 / 94, 50), (50.0, 1.0, 5), (50.0, 1.0, 6)]
    ours, theirs = epsilon(history, 1e-5, accountant), audit_epsilon(tuple(history), 1e-5, accountant)
    assert abs(ours - theirs) <= tolerance(accountant, theirs), (ours, theirs)
    assert ours > epsilon(history[1:], 1e-5, accountant)  # every release counts


def test_a_site_never_mixes_privacy_units(tmp_path):
    state = tmp_path / "state"
    budget = Budget(8.0, 1e-5, declared_examples=900, declared_users=10)
    assert unit_conflict("user", budget, state) is None and history_unit(state) is None
    save_history(state, [(2.0, 0.5, 10)], "prv", 1e-5, "user")
    assert history_unit(state) == "user"
    assert json.loads((state / "accountant.json").read_text())["unit"].startswith("user-level")
    assert unit_conflict("user", budget, state) is None
    reason = unit_conflict("example", budget, state)
    assert "holds user-level releases" in reason and "reset-accountant" in reason
    only_users = dataclasses.replace(budget, privacy_unit="user")
    assert "user level only" in unit_conflict("example", only_users, tmp_path / "fresh")
    assert public_sample_rate(32, budget, "user") == 1.0 and public_sample_rate(32, budget, "example") == 32 / 900


def test_a_users_histogram_weighs_one_in_l2(small_split):
    catalog, _, train_ex, _, _ = small_split
    units = privacy_units(train_ex, "user")
    total = unit_histogram(train_ex, len(catalog), "user")
    without = unit_histogram([ex for i, ex in enumerate(train_ex) if i not in set(units[0])], len(catalog), "user")
    assert abs(float((total - without).norm()) - 1.0) < 1e-5  # removing a whole user moves it by exactly 1
    counts = unit_histogram(train_ex, len(catalog), "example")
    assert float(counts.sum()) == len(train_ex)
