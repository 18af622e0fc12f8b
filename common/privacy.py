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
import os
from pathlib import Path

from opacus.accountants import create_accountant

History = list[tuple[float, float, int]]  # (noise multiplier σ, sample rate q, steps)

UNIT = "example-level (one training example of one client, add/remove adjacency)"


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε(δ) of the composition of all steps in ``history`` (0 if nothing has run)."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


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


def statement(eps: float, delta: float, accountant: str) -> str:
    return f"(ε = {eps:.3f}, δ = {delta:g})-DP, {UNIT}, {accountant.upper()} accountant"
