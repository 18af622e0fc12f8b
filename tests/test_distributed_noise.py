"""Distributed noise under SecAgg+ (``distributed-noise``): each site adds σ/√T to one gradient
step, only inside the secure sum, and is charged σ; the server steps with Adam on the sum.

The real parts: the 2-layer model's sequence tower under Opacus, Flower's SecAgg+ in a real
simulation, and the server's Adam against the formula. The real ClientApp's refusals outside
SecAgg+ are in tests/test_client.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from audit.site import site_audit
from client import client_app
from client.secure_aggregation import QUANTIZATION_SLACK_MAX, SecureSum, quantization_slack
from client.train import _collate_windows, dp_steps, mark_trained, share_step, train, user_windows
from common.config import ConfigError, Settings, defaults
from common.privacy import Budget, BudgetError, epsilon, load_history, read_budget
from server.aggregators import ServerAdam


def test_a_sites_share_is_one_sgd_step_with_sigma_over_root_t(sequence_training_model, small_split):
    """An empty Poisson sample leaves the noise alone: θ − θ' = N(0, (σ/√T)²C²) / batch-size on
    every trained number, and nothing else moves. The accountant is charged σ, the sum's."""
    model, tokenizer, s = sequence_training_model
    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(s, dp=True, noise_multiplier=6.0, max_grad_norm=0.5, batch_size=4, local_steps=1,
                            distributed_noise=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q, shared_by = 1e-12, 4  # nobody sampled
    protocol = SecureSum(threshold=shared_by, sites=5, clipping_range=8.0, levels=2 ** 22, max_weight=1.0)
    result = train(model, tokenizer, train_ex, s, history=[(4.0, 1.0, 1)], seed=0, q=q, share=protocol)
    assert result.history == [(4.0, 1.0, 1), (6.0, q, 1)]
    moved = {n: before[n] - p.detach() for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all(".sequence." in n for n in moved)  # the tower, never LoRA or the base
    noise = torch.cat([d.flatten() for d in moved.values()]) * s.batch_size / s.max_grad_norm
    share = s.noise_multiplier / math.sqrt(shared_by)  # 3.0; the whole σ would be 6.0, Adam's step ±lr
    assert noise.numel() > 2000
    assert abs(float(noise.std()) / share - 1) < 0.05, float(noise.std())
    assert abs(float(noise.mean())) < 5 * share / math.sqrt(noise.numel())
    assert result.quantization_slack <= QUANTIZATION_SLACK_MAX


def _normal_cdf(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _normal_pdf(x):
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _rounded(mean, sd, j):
    """P(Q(mean + N(0, sd²)) = j) for SecAgg+'s stochastic rounding Q, exactly: E[Λ(x − j)] with the
    triangle Λ = ramp(·+1) − 2·ramp + ramp(·−1), and E[(t + N(0, sd²))₊] = t·Φ(t/sd) + sd·φ(t/sd)."""
    def ramp(t):
        return t * _normal_cdf(t / sd) + sd * _normal_pdf(t / sd)
    z = mean - j
    return ramp(z + 1) - 2 * ramp(z) + ramp(z - 1)


def _rounded_after_triangle(mean, sd, j):
    """P(Q(W + T) = j), W ~ N(mean, sd²), T with density Λ: E[(Λ∗Λ)(W − j)], Λ∗Λ the cubic
    B-spline Σᵢ (−1)ⁱ C(4, i) (x + 2 − i)₊³ / 6, and E[(t + N(0, sd²))₊³] in closed form."""
    def cube(t):
        u = t / sd
        return (t ** 3 + 3 * t * sd ** 2) * _normal_cdf(u) + sd * (t * t + 2 * sd * sd) * _normal_pdf(u)
    return sum((-1) ** i * math.comb(4, i) * cube(mean - j + 2 - i) for i in range(5)) / 6


def test_rounding_each_share_is_within_the_slack_of_a_post_processing_of_the_gaussian_sum():
    """Two sites' shares y_k = μ_k + N(0, s²) in grid units. SecAgg+ sums Q(y_1) + Q(y_2); the
    accountant charges the Gaussian sum W = y_1 + y_2, of which Q(W + T) is a post-processing.
    Both pmfs exactly: their total variation distance is real at coarse grids, shrinks fast with
    s, and is never above quantization_slack's bound."""
    means, distances = (0.3, 0.55), []
    for s in (0.3, 0.5, 0.8, 1.2, 1.6):
        support = range(-int(20 * s) - 5, int(20 * s) + 7)
        first = {j: _rounded(means[0], s, j) for j in support}
        second = {j: _rounded(means[1], s, j) for j in support}
        summed: dict[int, float] = {}
        for a in support:
            for b in support:
                summed[a + b] = summed.get(a + b, 0.0) + first[a] * second[b]
        ideal = {j: _rounded_after_triangle(sum(means), s * math.sqrt(2), j) for j in summed}
        distance = sum(abs(summed[j] - ideal[j]) for j in summed) / 2
        # A grid of step 1 (r = levels / 2), weight 1, values far from ±r: only the rounding counts.
        bound = quantization_slack(SecureSum(2, 2, 2.0 ** 21, 2 ** 22, 1.0), s, 0.0, 1)
        assert distance <= bound, (s, distance, bound)
        distances.append(distance)
    assert distances[0] > 0.01  # not a post-processing of the sum: the accounting must cover it
    assert distances == sorted(distances, reverse=True) and distances[-1] < 1e-6


def test_the_slack_of_a_real_share_is_negligible_and_a_coarse_grid_is_refused(sequence_training_model):
    """The configuration measured in the README (σ = 3.0334, T = 10, C = 1, batch 26, r = 8 in
    2^22 steps) leaves τ below 1e-150 a round; a grid of 2^10 steps would not, and the site refuses."""
    model, _, s = sequence_training_model
    s = dataclasses.replace(s, dp=True, noise_multiplier=3.0334, max_grad_norm=1.0, batch_size=26,
                            distributed_noise=True)
    _, box, slack = share_step(model, s, SecureSum(10, 10, 8.0, 2 ** 22, 1.0))
    assert 0 < slack < 1e-150 and box == 2.0 * 26
    with pytest.raises(ConfigError, match=r"SecAgg\+'s quantization \(±8 in 1024 steps\) would leave τ"):
        share_step(model, s, SecureSum(10, 10, 8.0, 2 ** 10, 1.0))
    assert quantization_slack(SecureSum(10, 10, 8.0, 2 ** 22, 1.0), 0.037, 8.0, 1000) == math.inf  # no margin


def test_the_box_bounds_each_coordinate_of_the_clipped_sum(sequence_training_model, small_split):
    """Without noise and everyone sampled, one SGD step of size 1 moves each trained number by the
    clipped sum / batch-size: boxed, by at most box / batch-size; not boxed, by more."""
    model, _, s = sequence_training_model
    _, _, train_ex, _, _ = small_split
    s = dataclasses.replace(s, dp=True, noise_multiplier=0.0, max_grad_norm=1.0, batch_size=2, local_steps=1)
    samples, units = user_windows(train_ex, s.sequence_length)
    moved = {}
    for box in (None, 1e-3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        mark_trained(model, s)  # what share_step trains, with its SGD of step size 1
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        collate = _collate_windows(model, model.get_base_model().item_embeddings.shape[0])
        dp_steps(model, optimizer, samples, units, None, collate, s, 1.0, torch.Generator().manual_seed(0), box=box)
        moved[box] = max(float((before[n] - p.detach()).abs().max()) for n, p in model.named_parameters())
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(before[n])
    assert moved[1e-3] <= 1e-3 / s.batch_size + 1e-7  # float32 rounding of θ − step
    assert moved[None] > 10 * 1e-3 / s.batch_size


def replies_of(states: list[dict]) -> list[Message]:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    # Messages are made as the server makes them (Flower sets this identity inside a ServerApp).
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")
    return [Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 1.0})}),
                    reply_to=sent) for state in states]


def adam_by_formula(theta, gradients, lr, betas=(0.9, 0.999), eps=1e-8):
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    for t, g in enumerate(gradients, start=1):
        m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g * g
        theta = theta - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return theta


def server_adam_round(adam: ServerAdam, theta: torch.Tensor, site_gradients: list[torch.Tensor]) -> torch.Tensor:
    adam.sent = {"w": theta}  # what configure_train keeps of the global adapter it sends
    arrays, _ = adam.aggregate_train(1, replies_of([{"w": theta - g} for g in site_gradients]))
    return arrays.to_torch_state_dict()["w"]


def test_server_adam_steps_on_the_mean_gradient_and_resumes_exactly():
    """Sites send θ − g_k; FedAvg of equal weights gives θ − ḡ; the server's Adam steps with ḡ.
    A server restarted from the saved moments takes the very step an uninterrupted one takes."""
    generator = torch.Generator().manual_seed(0)
    theta0 = torch.randn(50, generator=generator)
    rounds = [[torch.randn(50, generator=generator) for _ in range(3)] for _ in range(3)]
    adam, theta = ServerAdam(FedAvg(), 0.01), theta0
    for gradients in rounds[:2]:
        theta = server_adam_round(adam, theta, gradients)
    expected = adam_by_formula(theta0, [sum(g) / 3 for g in rounds[:2]], 0.01)
    assert torch.allclose(theta, expected, atol=1e-6)
    assert (theta - theta0).abs().max() > 0.01  # it moved by about lr a coordinate
    restarted = ServerAdam(FedAvg(), 0.01)
    restarted.load_state_dict(adam.state_dict())
    assert torch.equal(server_adam_round(restarted, theta, rounds[2]), server_adam_round(adam, theta, rounds[2]))


def test_distributed_noise_max_sites_is_checked_where_it_is_read(tmp_path):
    (tmp_path / "budget.json").write_text(json.dumps({"epsilon-max": 8.0, "delta": 1e-5,
                                                      "distributed-noise-max-sites": 1}))
    with pytest.raises(BudgetError, match=r"budget.json: distributed-noise-max-sites must be a whole number >= 2"):
        read_budget(tmp_path, {})
    assert read_budget(tmp_path, {"distributed-noise-max-sites": 10}).distributed_noise_max_sites == 10


@pytest.mark.parametrize("overrides,message", [
    ({"distributed-noise": True}, "set dp = true and secure-aggregation = true"),
    ({"distributed-noise": True, "secure-aggregation": True, "local-steps": 2}, "set local-steps = 1"),
    ({"distributed-noise": True, "secure-aggregation": True, "local-steps": 1, "gradient-canaries": 4},
     "gradient-canaries audit the noise one site adds"),
    ({"server-optimizer": "adagrad"}, "server-optimizer must be 'sgd' or 'adam'"),
])
def test_settings_refuse_what_distributed_noise_cannot_account(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_run_config({**defaults(), **overrides})


SIGMA, PRIOR_SIGMA, SITES = 1.5, 2.0, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "FEDREC_HOME": str(base / "home")}
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", "2", "--clients", str(SITES), "--run-dir",
           str(base / "run"), "--set", "model-layers=2", "lora-layers=1", "max-users=60", "privacy-unit=user",
           "batch-size=8", "sequence-training=true", "sequence-length=20", "sequence-dim=16", "local-steps=1",
           f"noise-multiplier={SIGMA}", f"prior-noise-multiplier={PRIOR_SIGMA}", "secure-aggregation=true",
           "distributed-noise=true", "server-optimizer=adam", "server-learning-rate=0.01"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base / "run", base / "home", proc.stdout


def test_a_distributed_noise_run_charges_sigma_and_records_each_sites_share(run):
    run_dir, home, out = run
    threshold = 2  # Flower's SecAgg+: round(0.67 × 3 shares), at least 2
    sites = sorted(home.glob("partitions/*/client-*/state/run"))
    assert len(sites) == SITES
    for state in sites:
        log = [json.loads(line) for line in (state / "releases.jsonl").read_text().splitlines()]
        trains = [r for r in log if r["phase"] == "train"]
        assert [r["mechanism"] for r in trains] == ["dp-sgd", "dp-sgd"]  # and no user count
        # The prior went through SecAgg+ too: σ_h charged, its share σ_h/√T.
        prior = [r for r in log if r["phase"] == "prior"]
        assert len(prior) == 1 and prior[0]["noise_multiplier"] == PRIOR_SIGMA
        assert prior[0]["noise-shared-by"] == threshold
        assert prior[0]["own-noise-multiplier"] == pytest.approx(PRIOR_SIGMA / math.sqrt(threshold))
        assert all(r["noise_multiplier"] == SIGMA and r["steps"] == 1 and r["noise-shared-by"] == threshold
                   and r["own-noise-multiplier"] == pytest.approx(SIGMA / math.sqrt(threshold))
                   and 0 <= r["quantization-slack"] <= QUANTIZATION_SLACK_MAX for r in trains)
        history = load_history(state)
        assert log[-1]["epsilon-after"] == epsilon(history, 1e-5, "prv")
        audit = site_audit(state.parents[1], state)  # what `fedrec client audit` reports of SecAgg+'s rounding
        assert audit["quantization-delta"] == pytest.approx(
            sum(r["quantization-slack"] for r in trains + prior) * (1 + math.exp(audit["epsilon-recomputed"])))
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        kinds = {r[0] for r in db.execute("SELECT mechanism FROM mechanisms WHERE phase = 'train'")}
        sigmas = {r[0] for r in db.execute("SELECT noise_multiplier FROM mechanisms WHERE mechanism = 'dp-sgd'")}
    assert kinds == {"dp-sgd"} and sigmas == {SIGMA}
    assert (run_dir / "adapters" / "round-002" / "server-optimizer.pt").is_file()
    printed = " ".join(out.split())
    assert "only against a server that follows the protocol" in printed
    # The summary's bound on δ's addition: every site's τ at its maximum, 2 rounds and the prior's share.
    eps_max = max(epsilon(load_history(state), 1e-5, "prv") for state in sites)
    assert f"δ = 1e-05 + at most {(1 + math.exp(eps_max)) * 3 * QUANTIZATION_SLACK_MAX:.1g}," in printed


def test_the_servers_prior_is_the_sites_histograms_summed_inside_secagg(run):
    """The round-0 bias is log(1 + max(0, Σ_k share_k)): on items no site's users rated, the sum is
    noise alone, N(0, σ_h²·K/T) (K = 3 shares of σ_h/√T, T = 2), of which the server keeps the
    positive half: E[x² | x > 0] = σ_h²·K/T. A wrong count unit or a mean for a sum is off by far more."""
    from safetensors.torch import load_file

    from common.metrics import unit_histogram

    run_dir, home, _ = run
    adapter = load_file(run_dir / "adapters" / "round-000" / "adapter_model.safetensors")
    (bias,) = [v for k, v in adapter.items() if k.endswith("scorer.bias")]
    true = sum(unit_histogram(client_app.load_data(site, site.parent / "catalog.csv", defaults()["history-len"])[1],
                              len(bias), "user") for site in sorted(home.glob("partitions/*/client-*")))
    unrated = bias[true == 0].double()
    kept = torch.expm1(unrated[unrated > 0])
    assert len(unrated) > 200 and 0.4 < len(kept) / len(unrated) < 0.6
    expected = PRIOR_SIGMA * math.sqrt(SITES / 2)
    assert abs(float(kept.pow(2).mean().sqrt()) / expected - 1) < 0.2, float(kept.pow(2).mean().sqrt())


def test_a_site_refuses_a_secagg_threshold_above_its_own_limit():
    """The server sets SecAgg+'s threshold T; the site's share σ/√T never goes below σ/√(its limit)."""
    from client import secure_aggregation

    s = Settings.from_run_config({**defaults(), "distributed-noise": True, "secure-aggregation": True,
                                  "local-steps": 1})
    budget = Budget(8.0, 1e-5, distributed_noise_max_sites=5)
    for threshold, allowed in ((5, True), (6, False)):
        protocol = secure_aggregation.SecureSum(threshold, 10, 8.0, 2 ** 22, 1.0)
        marker = secure_aggregation._protocol.set(protocol)  # what secure_aggregation_mod sets inside SecAgg+
        try:
            if allowed:
                assert client_app.noise_share(s, budget) == protocol
            else:
                with pytest.raises(ConfigError, match="threshold is 6 sites, more than this site's "
                                                      "distributed-noise-max-sites = 5"):
                    client_app.noise_share(s, budget)
        finally:
            secure_aggregation._protocol.reset(marker)
    with pytest.raises(ConfigError, match="outside SecAgg"):
        client_app.noise_share(s, budget)
