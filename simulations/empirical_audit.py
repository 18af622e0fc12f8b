"""The empirical privacy audit: a one-run canary audit (Steinke, Nasr & Jagielski 2023).

Canaries. ``fedrec simulate --set canaries=1000`` has the partitioner plant m synthetic users
in the simulated clients' data. A canary user has two interactions: a random catalog item
with a unique nonsense phrase as the user's own words, then a random target item. Leave-last-out
turns that into exactly one training example (the unit of privacy). Each canary is included
independently with probability ½, drawn from the OS entropy pool and written only to
``PARTITION_DIR/audit-canaries.json`` — the users' side, never the server's.

Score. From the released global adapters alone: how much the final adapter raised the
log-probability of a canary's target given its text, relative to the initial adapter (round
000), minus the same rise averaged over the other canaries' texts (which removes the drift
every user sees for that item). The auditor guesses "included" for the k highest scores and
abstains on the rest; unsampled included canaries look excluded, so it never guesses "excluded".

Bound. If the mechanism is (ε, δ)-DP with respect to each canary, the number V of correct
guesses out of r satisfies (Steinke et al. 2023, appendix D)

    P[V ≥ v] ≤ P[Bin(r, q) ≥ v] + 2mδ · max_{1≤i≤v} P[v−i ≤ Bin(r, q) < v] / i,   q = e^ε / (1 + e^ε).

ε_lb is the largest ε this rejects at level p = 0.05: with 95 % confidence the run is not
(ε, δ)-DP for any ε < ε_lb. The k are a fixed grid chosen before looking, so the 5 % is split
over the grid (Bonferroni). A valid DP run must give ε_lb ≤ its proven ε; a larger ε_lb is a bug.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import numpy as np
from scipy.stats import binom

from common.data import Catalog, Interaction, user_text

CANARY_FILE = "audit-canaries.json"
GUESS_GRID = (10, 25, 50, 100, 200, 400)  # k, the number of "included" guesses
CONFIDENCE = 0.95
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


# --- planting ------------------------------------------------------------------------------


def make_canaries(catalog: Catalog, m: int, num_clients: int) -> list[dict]:
    """m canary users, spread round-robin over the clients, each included with probability ½."""
    rng = np.random.default_rng(secrets.randbits(128))  # the auditor's secret
    canaries = []
    for i in range(m):
        words = ["".join(rng.choice(SYLLABLES, size=3)) for _ in range(4)]
        history, target = rng.choice(len(catalog), size=2, replace=False)
        canaries.append({"user": f"canary-{i:04d}", "client": i % num_clients, "phrase": " ".join(words),
                         "history-item": catalog.items[history].item_id, "target-item": catalog.items[target].item_id,
                         "included": bool(rng.random() < 0.5)})
    return canaries


def canary_interactions(canary: dict) -> list[Interaction]:
    return [Interaction(canary["user"], canary["history-item"], 5.0, 1, canary["phrase"]),
            Interaction(canary["user"], canary["target-item"], 5.0, 2)]


def read_canaries(partition_dir: Path) -> list[dict]:
    path = Path(partition_dir) / CANARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no canaries; run the simulation with --set canaries=1000 first")
    return json.loads(path.read_text())["canaries"]


# --- the bound -----------------------------------------------------------------------------


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[V ≥ v] for an (ε, δ)-DP mechanism: r guesses, v correct, m canaries."""
    if v == 0:
        return 1.0
    q = 1 / (1 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0:
        return min(1.0, tail)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # [i-1] = P[v-i ≤ Bin < v]
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 1 - CONFIDENCE) -> float:
    """The largest ε that ``v`` correct out of ``r`` guesses rejects at level p (0 if none)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p and hi < 64:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < p else (lo, mid)
    return lo


def audit_scores(scores: np.ndarray, included: np.ndarray, delta: float) -> dict:
    """ε_lb from membership scores: guess "included" for the top k, for every k of the grid."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    grid = [k for k in GUESS_GRID if k <= m]
    p = (1 - CONFIDENCE) / len(grid)
    rows = []
    for k in grid:
        correct = int(included[order[:k]].sum())
        rows.append({"guesses": k, "correct": correct, "epsilon-lb": epsilon_lower_bound(m, k, correct, delta, p)})
    best = max(rows, key=lambda row: row["epsilon-lb"])
    return {"canaries": m, "included": int(included.sum()), "delta": delta, "confidence": CONFIDENCE,
            "bonferroni-over": len(grid), "by-guesses": rows, "epsilon-lb": best["epsilon-lb"]}


# --- scoring a run -------------------------------------------------------------------------


def canary_scores(run_dir: Path, canaries: list[dict]) -> np.ndarray:
    """Each canary's membership score from the run's initial and final global adapters."""
    import torch

    from common.model import score_users
    from common.recommend import latest_adapter, load_recommender

    log_probs = []
    for adapter in (run_dir / "adapters" / "round-000", latest_adapter(run_dir)):
        model, tokenizer, catalog, s = load_recommender(run_dir, adapter)
        texts = [user_text(canary_interactions(c)[:1], catalog, s.history_len) for c in canaries]
        logits = score_users(model, tokenizer, texts, s.max_length)
        seen = torch.tensor([catalog.index[c["history-item"]] for c in canaries])
        logits[torch.arange(len(canaries)), seen] = float("-inf")  # as in training: seen items are masked
        log_probs.append(torch.log_softmax(logits.double(), dim=1))
    rise = log_probs[1] - log_probs[0]
    targets = torch.tensor([catalog.index[c["target-item"]] for c in canaries])
    own = rise[torch.arange(len(canaries)), targets]
    others = (rise[:, targets].sum(0) - own) / max(len(canaries) - 1, 1)
    return (own - others).numpy()


def empirical_audit(run_dir: Path, proven_epsilon: float | None, delta: float) -> dict:
    """The one-run audit of a simulation planted with canaries, beside the proven ε."""
    config = json.loads((run_dir / "config.json").read_text())
    canaries = read_canaries(Path(config["run-config"]["partition-dir"]))
    scores = canary_scores(run_dir, canaries)
    included = np.array([c["included"] for c in canaries])
    result = audit_scores(scores, included, delta)
    result["proven-epsilon"] = proven_epsilon
    result["score-included"] = scores[included].tolist()
    result["score-excluded"] = scores[~included].tolist()
    result["below-proven"] = proven_epsilon is None or result["epsilon-lb"] <= proven_epsilon
    return result
