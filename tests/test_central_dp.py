"""Client-level central DP at the server (server/central_dp.py): the noise, the clipping, the
fixed denominator, Poisson sampling and the accountant."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import ConfigError, Settings, defaults
from common.privacy import epsilon
from server.central_dp import ClientLevelDP

SHAPES = {"layer.lora_B": (384, 4), "other.lora_B": (96, 4)}


def state(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {k: torch.full(s, value) for k, s in SHAPES.items()}


def mechanism(z=1.0, clip=2.0, population=10, expected=5, seed=0) -> ClientLevelDP:
    return ClientLevelDP(z, clip, 1e-5, population, expected, generator=torch.Generator().manual_seed(seed))


def test_noise_has_the_stated_standard_deviation():
    """z·C/m per coordinate of the mean update: estimated from 40 × 1,920 draws, the sample
    standard deviation has a relative standard error of 1/√(2n) ≈ 0.26 %; we allow 1.5 %."""
    dp = mechanism(z=0.7, clip=2.0, expected=5)
    draws = torch.cat([torch.cat([v.flatten() for v in dp.noisy_mean_update(state(), [], set(SHAPES)).values()])
                       for _ in range(40)]).double()
    stated = 0.7 * 2.0 / 5
    assert abs(draws.std().item() / stated - 1) < 0.015
    assert abs(draws.mean().item()) < 4 * stated / math.sqrt(draws.numel())


def test_equal_clipped_updates_give_their_mean_plus_that_noise():
    """Four clients send the same update of norm 10·C: each is clipped to C, the four are summed,
    the noise is added, and the sum is divided by the fixed m = 5 (not by the 4 that replied)."""
    sent = state(0.5)
    received = [{k: v + 0.3 for k, v in sent.items()} for _ in range(4)]
    norm = math.sqrt(sum(v.numel() for v in sent.values())) * 0.3
    clip = norm / 10
    update = mechanism(z=0.8, clip=clip, seed=7).noisy_mean_update(sent, received, set(SHAPES))

    replay = torch.Generator().manual_seed(7)
    noise = {k: 0.8 * clip * torch.randn(v.shape, dtype=torch.float64, generator=replay) for k, v in sent.items()}
    for k in sent:
        clipped = torch.full(SHAPES[k], 0.3 * clip / norm, dtype=torch.float64)
        expected = (4 * clipped + noise[k]) / 5
        assert torch.allclose(update[k].double(), expected, atol=1e-6)
    # The noise really is there: the update is not the clipped mean alone.
    assert not torch.allclose(update["layer.lora_B"].double(), torch.full((384, 4), 4 * 0.3 * clip / norm / 5,
                                                                         dtype=torch.float64), atol=1e-3)


def test_small_updates_are_not_scaled():
    sent = state(0.0)
    small = {k: torch.full(s, 1e-3) for k, s in SHAPES.items()}
    update = mechanism(z=1e-12, clip=100.0, expected=2).noisy_mean_update(sent, [small, small], set(SHAPES))
    for k in SHAPES:
        assert torch.allclose(update[k], small[k], atol=1e-9)


def test_frozen_tensors_are_neither_taken_nor_noised():
    """A tensor the run keeps frozen (LoRA's A under FFA-LoRA) stays exactly as sent, even if a
    client changed it; only the trained ones carry the clipped updates and the noise."""
    sent = state(0.0)
    tampered = {"layer.lora_B": torch.full(SHAPES["layer.lora_B"], 0.01),
                "other.lora_B": torch.full(SHAPES["other.lora_B"], 5.0)}
    update = mechanism(z=1.0, clip=1.0).noisy_mean_update(sent, [tampered], {"layer.lora_B"})
    assert torch.equal(update["other.lora_B"], torch.zeros(SHAPES["other.lora_B"]))
    assert update["layer.lora_B"].std() > 0.1  # noise z·C/m = 0.2 per coordinate


def test_poisson_sampling_rate():
    dp = mechanism(population=10, expected=3)
    nodes = list(range(10))
    counts = [len(dp.sample(nodes)) for _ in range(4000)]
    mean = sum(counts) / len(counts)
    # Binomial(10, 0.3): mean 3, standard error of the mean √2.1/√4000 ≈ 0.023.
    assert abs(mean - 3) < 0.1
    assert min(counts) == 0 or max(counts) > 3  # the count varies: not a fixed-size sample
    assert len(set(counts)) > 3


@pytest.mark.parametrize(("z", "population", "expected", "rounds"), [(1.0, 10, 10, 5), (0.8, 100, 10, 30)])
def test_accountant_agrees_with_opacus(z, population, expected, rounds):
    """Flower's RdpAccountant (dp-accounting inside) and Opacus' RDP accountant, two codebases,
    give the same ε for the same Poisson-subsampled Gaussian history."""
    dp = mechanism(z=z, population=population, expected=expected)
    eps = [dp.release() for _ in range(rounds)]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(epsilon([(z, expected / population, rounds)], 1e-5, "rdp"), rel=1e-3)


def test_the_population_is_declared_and_checked_and_delta_is_below_one_over_n():
    """N is the federation's declared size (central-population), never whoever connected first:
    undeclared is refused, more clients than N are refused, and δ < 1/N."""
    central = {**defaults(), "central-dp": True, "popularity-prior": False}
    with pytest.raises(ConfigError, match="central-dp needs central-population = N"):
        Settings.from_run_config({**central, "central-delta": 0.05}).check_population(10)
    s = Settings.from_run_config({**central, "central-delta": 0.05, "central-population": 10})
    s.check_population(10)
    s.check_population(3)  # fewer present than declared: each is still sampled at q = m/N
    with pytest.raises(ConfigError, match="11 clients are connected, more than central-population = 10"):
        s.check_population(11)
    with pytest.raises(ConfigError, match=r"central-delta = 0.1 must be < 1/N = 0.1 for N = central-population = 10"):
        Settings.from_run_config({**central, "central-delta": 0.1, "central-population": 10}).check_population(10)
    with pytest.raises(ConfigError, match="set dp = false .* or popularity-prior = false"):
        Settings.from_run_config({**defaults(), "central-dp": True})
    Settings.from_run_config({**defaults(), "central-dp": True, "dp": False})  # the central prior


def test_the_central_prior_clips_each_histogram_to_one_and_adds_one_noise():
    """Σ_k h_k / max(1, ‖h_k‖) + N(0, σ_h²): a histogram of norm 5 counts as norm 1, one of norm
    ½ as itself; the noise has std σ_h whatever the number of clients; the release is one
    Gaussian (q = 1) in the central accountant, equal to Opacus' RDP for the same history."""
    histograms = [torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 0.5])]
    dp = mechanism(population=10, expected=5)
    exact = dp.noisy_histogram_sum(histograms, 1e-9)
    assert torch.allclose(exact, torch.tensor([0.6, 0.8, 0.5]), atol=1e-6)
    draws = torch.cat([mechanism(seed=k).noisy_histogram_sum([torch.zeros(4000)] * 50, 2.0) for k in range(5)])
    assert abs(draws.double().std().item() / 2.0 - 1) < 0.02  # 20,000 draws: relative s.e. 0.5 %
    dp = mechanism(z=1.0, population=10, expected=5)
    dp.noisy_histogram_sum(histograms, 3.0)
    for _ in range(4):
        dp.release()
    history = [(3.0, 1.0, 1), (1.0, 0.5, 4)]
    assert dp.accountant.get_epsilon(1e-5) == pytest.approx(epsilon(history, 1e-5, "rdp"), rel=1e-2)


def test_one_client_per_user_is_refused_under_local_dp_with_the_settings_to_use():
    with pytest.raises(ConfigError, match="one client per user.*dp = false central-dp = true central-population"):
        Settings.from_run_config({**defaults(), "partition": "user"})
    Settings.from_run_config({**defaults(), "partition": "user", "dp": False, "central-dp": True,
                              "central-population": 100})
