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

from client import client_app
from client.train import train
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
    result = train(model, tokenizer, train_ex, s, history=[(4.0, 1.0, 1)], seed=0, q=q, noise_shared_by=shared_by)
    assert result.history == [(4.0, 1.0, 1), (6.0, q, 1)]
    moved = {n: before[n] - p.detach() for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and all(".sequence." in n for n in moved)  # the tower, never LoRA or the base
    noise = torch.cat([d.flatten() for d in moved.values()]) * s.batch_size / s.max_grad_norm
    share = s.noise_multiplier / math.sqrt(shared_by)  # 3.0; the whole σ would be 6.0, Adam's step ±lr
    assert noise.numel() > 2000
    assert abs(float(noise.std()) / share - 1) < 0.05, float(noise.std())
    assert abs(float(noise.mean())) < 5 * share / math.sqrt(noise.numel())


def replies_of(states: list[dict]) -> list[Message]:
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


SIGMA, SITES = 1.5, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "FEDREC_HOME": str(base / "home")}
    cmd = [sys.executable, "-m", "common.cli", "simulate", "--rounds", "2", "--clients", str(SITES), "--run-dir",
           str(base / "run"), "--set", "model-layers=2", "lora-layers=1", "max-users=60", "privacy-unit=user",
           "batch-size=8", "sequence-training=true", "sequence-length=20", "sequence-dim=16", "local-steps=1",
           f"noise-multiplier={SIGMA}", "prior-noise-multiplier=2.0", "secure-aggregation=true",
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
        assert all(r["noise_multiplier"] == SIGMA and r["steps"] == 1 and r["noise-shared-by"] == threshold
                   and r["own-noise-multiplier"] == pytest.approx(SIGMA / math.sqrt(threshold)) for r in trains)
        history = load_history(state)
        assert log[-1]["epsilon-after"] == epsilon(history, 1e-5, "prv")
    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        kinds = {r[0] for r in db.execute("SELECT mechanism FROM mechanisms WHERE phase = 'train'")}
        sigmas = {r[0] for r in db.execute("SELECT noise_multiplier FROM mechanisms WHERE mechanism = 'dp-sgd'")}
    assert kinds == {"dp-sgd"} and sigmas == {SIGMA}
    assert (run_dir / "adapters" / "round-002" / "server-optimizer.pt").is_file()
    assert "only against a server that follows the protocol" in " ".join(out.split())


def test_a_site_refuses_a_secagg_threshold_above_its_own_limit():
    """The server sets SecAgg+'s threshold T; the site's share σ/√T never goes below σ/√(its limit)."""
    from client import secure_aggregation

    s = Settings.from_run_config({**defaults(), "distributed-noise": True, "secure-aggregation": True,
                                  "local-steps": 1})
    budget = Budget(8.0, 1e-5, distributed_noise_max_sites=5)
    for threshold, allowed in ((5, True), (6, False)):
        marker = secure_aggregation._threshold.set(threshold)  # what secure_aggregation_mod sets inside SecAgg+
        try:
            if allowed:
                assert client_app.noise_share(s, budget) == threshold
            else:
                with pytest.raises(ConfigError, match="threshold is 6 sites, more than this site's "
                                                      "distributed-noise-max-sites = 5"):
                    client_app.noise_share(s, budget)
        finally:
            secure_aggregation._threshold.reset(marker)
    with pytest.raises(ConfigError, match="outside SecAgg"):
        client_app.noise_share(s, budget)
