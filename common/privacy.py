"""Where ε is computed: example-level DP-SGD accounting, persisted across rounds.

Mechanism: each optimizer step is the Poisson-subsampled Gaussian mechanism — every
example joins the batch independently with probability q, each per-example gradient is
clipped to L2 norm C, and N(0, σ²C²) noise is added to their sum (Opacus DP-SGD).

Unit of privacy: one training example of one client (one user-history window → next
item), add/remove adjacency, within that client's dataset. One rating appears in up to
``history-len + 1`` examples, so per-rating or per-user guarantees follow only by group
privacy and are *not* what is printed.

A client's accountant history is the list of (σ, q, steps) it has run. It is stored in
the client's state directory and grows over the whole run (and across runs that share
the state directory), so ε is cumulative, never per round. ε is computed by Opacus'
accountant (RDP by default, or PRV) for a fixed δ.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from opacus.accountants import create_accountant

History = list[tuple[float, float, int]]  # (noise multiplier σ, sample rate q, steps)

UNIT = "example-level (one training example of one client, add/remove adjacency)"
# The server's optional central DP (server/central_dp.py) protects a different unit.
CLIENT_UNIT = "client-level (all the data of one client, add/remove adjacency)"


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the composition of all steps in ``history`` (0 if nothing has run)."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def independent_epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the same history computed by Google's ``dp-accounting``, not by Opacus.

    Like for like: its RDP accountant for histories Opacus accounted with RDP, its PLD
    accountant (numerical, like PRV) for PRV. Used by ``fedrec audit`` to check the ε that
    clients report; the two implementations share no code.
    """
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if not history:
        return 0.0
    events = []
    for sigma, q, steps in history:
        gaussian = dp_event.GaussianDpEvent(float(sigma))
        step = gaussian if float(q) >= 1.0 else dp_event.PoissonSampledDpEvent(float(q), gaussian)
        events.append(dp_event.SelfComposedDpEvent(step, int(steps)))
    acc = rdp_privacy_accountant.RdpAccountant() if accountant == "rdp" else pld_privacy_accountant.PLDAccountant()
    acc.compose(dp_event.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def load_history(state_dir: Path) -> History:
    path = Path(state_dir) / "accountant.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [tuple(step) for step in data["history"]]


def save_history(state_dir: Path, history: History, accountant: str, delta: float) -> None:
    """Atomically replace the stored history (a crash never leaves a half-written file)."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / "accountant.json.tmp"
    tmp.write_text(json.dumps({
        "accountant": accountant,
        "delta": delta,
        "unit": UNIT,
        "history": [list(step) for step in history],
        "epsilon": epsilon(history, delta, accountant),
    }, indent=1))
    os.replace(tmp, state_dir / "accountant.json")


@dataclass(frozen=True)
class Budget:
    """A client's own privacy budget: it never lets its ε at ``delta`` pass ``epsilon_max``.

    It comes from the client's side only — ``--node-config "epsilon-max=… delta=…"`` or
    ``budget.json`` in its data directory — so nothing the server sends can raise it.
    ``epsilon_max = inf`` (JSON ``null``) is "no limit", which only a non-private run needs.
    """

    epsilon_max: float
    delta: float
    source: str = ""


BUDGET_FILE = "budget.json"


class BudgetError(ValueError):
    """The client's budget is missing or malformed; the message names where it was read."""


def read_budget(data_dir: Path, node_config: dict) -> Budget:
    """The node's budget: node config ``epsilon-max``/``delta`` if set, else ``budget.json``."""
    if "epsilon-max" in node_config:
        source = "node-config"
        raw = {"epsilon-max": node_config["epsilon-max"], "delta": node_config.get("delta")}
    else:
        path = Path(data_dir) / BUDGET_FILE
        source = str(path)
        if not path.is_file():
            raise BudgetError(f"{path}: no privacy budget. Write {{\"epsilon-max\": 8.0, \"delta\": 1e-5}} "
                              "there or start the node with --node-config \"epsilon-max=8.0 delta=1e-5\"")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BudgetError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise BudgetError(f"{path}: expected an object with epsilon-max and delta")
    eps, delta = raw.get("epsilon-max"), raw.get("delta")
    eps = math.inf if eps is None else eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise BudgetError(f"{source}: epsilon-max must be a number > 0 (or null for no limit), got {eps!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise BudgetError(f"{source}: delta must be a number in (0, 1), got {delta!r}")
    return Budget(float(eps), float(delta), source)


def write_budget(data_dir: Path, budget: Budget) -> None:
    eps = None if math.isinf(budget.epsilon_max) else budget.epsilon_max
    (Path(data_dir) / BUDGET_FILE).write_text(json.dumps({"epsilon-max": eps, "delta": budget.delta}) + "\n")


def spend(history: History, mechanism: tuple[float, float, int], budget: Budget,
          accountant: str = "rdp") -> tuple[bool, float]:
    """Whether running ``mechanism`` (σ, q, steps) keeps ε(δ) within the budget, and the ε after it.

    The check runs before any private data is touched, on the same accountant that records
    the run, so a client never ends above ``epsilon_max``.
    """
    after = epsilon(list(history) + [mechanism], budget.delta, accountant)
    return after <= budget.epsilon_max, after


def client_id(state_dir: Path) -> int:
    """This client's id in this run: random, made once and kept in its state directory.

    The server names the client in its ledger by a pseudonym of this id, so a client keeps one
    name across server restarts (a resumed run), when Flower's node ids change."""
    path = Path(state_dir) / "client-id"
    if not path.is_file():
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(secrets.randbits(62)))
        os.replace(tmp, path)
    return int(path.read_text())


def history_metrics(history: History) -> dict[str, list]:
    """The accountant history as reply metrics: the server records any release it did not see
    (one a crashed server received but never committed), so ``fedrec audit`` can recompute ε."""
    return {"history-noise-multiplier": [float(h[0]) for h in history],
            "history-sample-rate": [float(h[1]) for h in history],
            "history-steps": [int(h[2]) for h in history]}


def statement(eps: float, delta: float, accountant: str) -> str:
    return f"(ε = {eps:.3f}, δ = {delta:g})-DP, {UNIT}, {accountant.upper()} accountant"
