"""Client-enforced privacy budgets: a client never ends a run above its own ε_max."""

from __future__ import annotations

import dataclasses
from pathlib import Path
import json
import math

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from client.client_app import check_budget
from common.config import Settings, defaults
from common.privacy import Budget, BudgetError, epsilon, public_sample_rate, read_budget, write_budget


@hsettings(max_examples=30, deadline=None)
@given(
    sigma=st.floats(0.5, 3.0),
    examples=st.integers(50, 20_000),
    batch=st.integers(8, 512),
    steps=st.integers(1, 200),
    rounds=st.integers(1, 25),
    prior=st.booleans(),
    eps_max=st.floats(0.2, 10.0),
)
def test_a_client_never_ends_a_run_above_its_budget(sigma, examples, batch, steps, rounds, prior, eps_max):
    run_to_the_end(sigma, examples, batch, steps, rounds, prior, eps_max, "rdp")


def test_the_budget_holds_under_the_prv_accountant_too():
    run_to_the_end(0.8, 9430, 256, 10, 12, True, 2.5, "prv")


def run_to_the_end(sigma, examples, batch, steps, rounds, prior, eps_max, accountant, state_dir=Path("/nonexistent")):
    """Drive the client's own budget check over a whole run: every round it either refuses or
    runs (and records) the mechanism it priced; the final ε is within ε_max whatever happens."""
    s = dataclasses.replace(Settings.from_run_config(defaults()), noise_multiplier=sigma, batch_size=batch,
                            local_steps=steps, accountant=accountant)
    budget = Budget(eps_max, 1e-5, declared_examples=examples)
    history = []
    requests = ([(s.prior_noise_multiplier, 1.0, 1)] if prior else []) + \
        [(sigma, public_sample_rate(batch, budget), steps)] * rounds
    ran = 0
    for mechanism in requests:
        if check_budget(s, budget, state_dir, history, [mechanism]) is None:
            if history and history[-1][:2] == mechanism[:2]:  # as Opacus' accountant records repeats
                history[-1] = (*mechanism[:2], history[-1][2] + mechanism[2])
            else:
                history.append(mechanism)
            ran += 1
    assert epsilon(history, budget.delta, accountant) <= eps_max
    if ran < len(requests):  # it stopped because the next mechanism would have crossed ε_max
        assert check_budget(s, budget, state_dir, history, [requests[ran]]) is not None


def test_budget_file_and_node_config(tmp_path):
    write_budget(tmp_path, Budget(3.0, 1e-6))
    assert read_budget(tmp_path, {}) == Budget(3.0, 1e-6, str(tmp_path / "budget.json"))
    # The node config wins over the file, key by key.
    assert read_budget(tmp_path, {"epsilon-max": 1.5, "delta": 1e-7}) == Budget(
        1.5, 1e-7, f"{tmp_path / 'budget.json'} and node-config")
    assert read_budget(tmp_path / "none", {"epsilon-max": 1.5, "delta": 1e-7, "declared-examples": 9}) == Budget(
        1.5, 1e-7, "node-config", 9)
    write_budget(tmp_path, Budget(2.0, 1e-5, declared_examples=5000))
    assert read_budget(tmp_path, {}).declared_examples == 5000
    assert public_sample_rate(64, read_budget(tmp_path, {})) == 64 / 5000
    with pytest.raises(BudgetError, match="declared-examples is not set"):
        public_sample_rate(64, Budget(2.0, 1e-5, "node-config"))
    write_budget(tmp_path, Budget(math.inf, 1e-5))
    assert json.loads((tmp_path / "budget.json").read_text())["epsilon-max"] is None
    assert read_budget(tmp_path, {}).epsilon_max == math.inf


@pytest.mark.parametrize("content, message", [
    ('{"epsilon-max": -1, "delta": 1e-5}', "epsilon-max must be a number > 0"),
    ('{"epsilon-max": "8", "delta": 1e-5}', "epsilon-max must be a number > 0"),
    ('{"epsilon-max": 8}', r"delta must be a number in \(0, 1\)"),
    ('{"epsilon-max": 8, "delta": 1}', r"delta must be a number in \(0, 1\)"),
    ("[8, 1e-5]", "expected an object"),
    ('{"epsilon-max": 8, "delta": 1e-5, "declared-examples": 0}', "declared-examples must be a whole number"),
    ('{"epsilon-max": 8, "delta": 1e-5, "declared-examples": 12.5}', "declared-examples must be a whole number"),
    ("{epsilon-max: 8}", "not valid JSON"),
])
def test_bad_budget_file_names_the_file_and_the_field(tmp_path, content, message):
    (tmp_path / "budget.json").write_text(content)
    with pytest.raises(BudgetError, match=message) as err:
        read_budget(tmp_path, {})
    assert str(tmp_path / "budget.json") in str(err.value)
