"""The empirical privacy audit: a one-run canary audit (Steinke, Nasr & Jagielski 2023).

Canaries. ``fedrec simulate --set canaries=1000`` has the partitioner plant m synthetic users
in the simulated clients' data. A canary user has two interactions: a random catalog item
with a unique phrase (five random words of the encoder's vocabulary) as the user's own words,
then a target item no other canary has. Leave-last-out turns that into exactly one training
example: a canary of one example, for the example-level claim (and a user-level one: a user
of one example). With ``canary-examples`` = k > 1 (``privacy-unit = user`` only) a canary user
has k training examples, each with the phrase and the target, plus the same target held out
for validation and test: included or not as a whole, it audits the user-level claim. Each
canary is included independently with probability ½,
drawn from the OS entropy pool and written only to ``PARTITION_DIR/audit-canaries.json`` —
the users' side, never the server's.

Scores, from the released global adapters; the auditor also knows every non-canary example
(the audit's guarantee holds for any fixed rest of the data). Two, each a fixed function:

* ``popularity-prior``: the round-000 item bias is log(1 + Σ noisy counts), so
  exp(b_t) − 1 − (non-canary count of t) is the canary's own +1 plus the histogram noise.
* ``adapter``: how much the final adapter raised the log-probability of a canary's target
  given its text, relative to round 000, minus the same rise averaged over the other
  canaries' texts (which removes the drift every user sees for that item): what DP-SGD
  memorised of that one example.

The auditor guesses "included" for the k highest scores and abstains on the rest (an
unsampled included canary looks excluded, so it never guesses "excluded").

Bound. If the mechanism is (ε, δ)-DP with respect to each canary, the number V of correct
guesses out of r satisfies (Steinke et al. 2023, appendix D)

    P[V ≥ v] ≤ P[Bin(r, q) ≥ v] + 2mδ · max_{1≤i≤v} P[v−i ≤ Bin(r, q) < v] / i,   q = e^ε / (1 + e^ε).

ε_lb is the largest ε this rejects at level p = 0.05: with 95 % confidence the run is not
(ε, δ)-DP for any ε < ε_lb. The scores and the k are fixed before looking, so the 5 % is split
over every (score, k) pair (Bonferroni). A valid DP run must give ε_lb ≤ its proven ε; a
larger ε_lb is a bug.
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
PHRASE_WORDS = 5


# --- planting ------------------------------------------------------------------------------


def phrase_words(model_dir: Path) -> list[str]:
    """Whole words of the encoder's own vocabulary: each is one token, so canaries share few."""
    vocab = Path(model_dir) / "vocab.txt"
    if vocab.is_file():
        words = [w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha() and w.isascii() and len(w) >= 4]
        if len(words) >= 1000:
            return words
    # Tokenizers without a word list: nonsense words (they split into shared sub-words: less power).
    return [c1 + v1 + c2 + v2 for c1 in "bdfgklmnprstvz" for v1 in "aeiou" for c2 in "bdfgklmnprstvz" for v2 in "aeiou"]


def make_canaries(catalog: Catalog, m: int, num_clients: int, words: list[str], examples: int = 1) -> list[dict]:
    """m canary users of ``examples`` training examples each, spread round-robin over the
    clients, each included with probability ½."""
    rng = np.random.default_rng(secrets.randbits(128))  # the auditor's secret
    canaries = []
    targets = rng.choice(len(catalog), size=m, replace=m > len(catalog))
    for i in range(m):
        words_i = rng.choice(words, size=PHRASE_WORDS, replace=False).tolist()
        target = targets[i]
        history = rng.choice([j for j in range(len(catalog)) if j != target])
        canaries.append({"user": f"canary-{i:04d}", "client": i % num_clients, "phrase": " ".join(words_i),
                         "history-item": catalog.items[history].item_id, "target-item": catalog.items[target].item_id,
                         "examples": examples, "included": bool(rng.random() < 0.5)})
    return canaries


def canary_interactions(canary: dict) -> list[Interaction]:
    """One canary user's events. k = 1: the phrase on a random item, then the target (one
    training example). k > 1: then k − 1 more events of the target with the phrase, and the
    target twice more (held out as validation and test): k training examples, each predicting
    the target from a text with the phrase."""
    user, phrase, target = canary["user"], canary["phrase"], canary["target-item"]
    events = [Interaction(user, canary["history-item"], 5.0, 1, phrase)]
    k = canary.get("examples", 1)
    if k == 1:
        return events + [Interaction(user, target, 5.0, 2)]
    events += [Interaction(user, target, 5.0, 1 + t, phrase) for t in range(1, k)]
    return events + [Interaction(user, target, 5.0, k + t) for t in (1, 2, 3)]


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


def audit_scores(scores: dict[str, np.ndarray], included: np.ndarray, delta: float, audits: int = 1) -> dict:
    """ε_lb from membership scores: guess "included" for the top k, for every score and k of the grid.
    The 5 % is split over every (score, k) pair and over ``audits`` such audits made together."""
    m = len(included)
    grid = [k for k in GUESS_GRID if k <= m]
    p = (1 - CONFIDENCE) / (len(grid) * len(scores) * audits)
    rows = []
    for name, values in scores.items():
        order = np.argsort(-values, kind="stable")
        for k in grid:
            correct = int(included[order[:k]].sum())
            rows.append({"score": name, "guesses": k, "correct": correct,
                         "epsilon-lb": epsilon_lower_bound(m, k, correct, delta, p)})
    best = max(rows, key=lambda row: row["epsilon-lb"])
    return {"canaries": m, "included": int(included.sum()), "delta": delta, "confidence": CONFIDENCE,
            "bonferroni-over": len(rows) * audits, "by-guesses": rows, "epsilon-lb": best["epsilon-lb"],
            "best": {k: best[k] for k in ("score", "guesses", "correct")}}


# --- scoring a run -------------------------------------------------------------------------


def non_canary_counts(partition_dir: Path, catalog: Catalog, history_len: int) -> np.ndarray:
    """How often each item is a training target in the simulated clients' real (non-canary) data."""
    from common.data import leave_last_out, read_interactions

    counts = np.zeros(len(catalog))
    for client in sorted(Path(partition_dir).glob("client-*")):
        users = {u: h for u, h in read_interactions(client, catalog).items() if not u.startswith("canary-")}
        for example in leave_last_out(users, catalog, history_len)[0]:
            counts[example.target] += 1
    return counts


def canary_scores(run_dir: Path, canaries: list[dict], partition_dir: Path) -> dict[str, np.ndarray]:
    """Each canary's membership scores from the run's initial and final global adapters."""
    import torch

    from safetensors.torch import load_file

    from common.model import adapter_state, load_adapter_state, refresh_item_embeddings, score_users
    from common.recommend import latest_adapter, load_recommender

    initial = run_dir / "adapters" / "round-000"
    model, tokenizer, catalog, s = load_recommender(run_dir, initial)  # one encoder load for both adapters
    (bias,) = [v for k, v in adapter_state(model).items() if k.endswith("scorer.bias")]
    prior_counts = torch.expm1(bias.double()).cpu().numpy()
    texts = [user_text(canary_interactions(c)[:1], catalog, s.history_len) for c in canaries]
    sequences = [(catalog.index[c["history-item"]],) for c in canaries]
    log_probs = []
    for adapter in (initial, latest_adapter(run_dir)):
        if adapter != initial:
            load_adapter_state(model, load_file(str(adapter / "adapter_model.safetensors")))
            refresh_item_embeddings(model, tokenizer, catalog.texts())
        logits = score_users(model, tokenizer, texts, s.max_length, sequences=sequences)
        seen = torch.tensor([catalog.index[c["history-item"]] for c in canaries])
        logits[torch.arange(len(canaries)), seen] = float("-inf")  # as in training: seen items are masked
        log_probs.append(torch.log_softmax(logits.double(), dim=1))
    rise = log_probs[1] - log_probs[0]  # NaN where an item is masked as seen: left out below
    targets = torch.tensor([catalog.index[c["target-item"]] for c in canaries])
    own = rise[torch.arange(len(canaries)), targets]
    column = rise[:, targets]  # [other canary's text, this canary's target]
    column.fill_diagonal_(float("nan"))
    expected = non_canary_counts(partition_dir, catalog, s.history_len)
    return {"popularity-prior": prior_counts[targets.numpy()] - expected[targets.numpy()],
            "adapter": (own - column.nanmean(0)).numpy()}


def empirical_audit(run_dir: Path, proven_epsilon: float | None, delta: float) -> dict:
    """The one-run audit of a simulation planted with canaries, beside the proven ε."""
    config = json.loads((run_dir / "config.json").read_text())
    partition_dir = Path(config["run-config"]["partition-dir"])
    canaries = read_canaries(partition_dir)
    scores = canary_scores(run_dir, canaries, partition_dir)
    included = np.array([c["included"] for c in canaries])
    result = audit_scores(scores, included, delta)
    result["proven-epsilon"] = proven_epsilon
    result["scores"] = {name: {"included": v[included].tolist(), "excluded": v[~included].tolist()}
                        for name, v in scores.items()}
    result["below-proven"] = proven_epsilon is None or result["epsilon-lb"] <= proven_epsilon
    return result


# --- white-box DP-SGD canaries (each site's noise, checked) ----------------------------------


def gradient_canary_scores(x: np.ndarray, q: float, sigma: float) -> dict[str, np.ndarray]:
    """Membership scores of m canaries from a site's T × m observations x_{t,k} (client/train.py
    ``GradientCanaries``: a joined canary adds 1 to its x_t, the noise N(0, σ²)). Both fixed in
    advance: the largest observation, and the log-likelihood ratio of "joins each step at rate q"
    against "never", Σ_t log(1 − q + q·exp((2x_t − 1) / 2σ²)), at the σ the site recorded."""
    ratio = np.log1p(q * np.expm1(np.clip((2 * x - 1) / (2 * sigma**2), None, 700))).sum(0)
    return {"max": x.max(0), "likelihood-ratio": ratio}


def gradient_canary_audit(partition_dir: Path, run_name: str, name_of, audit_epsilon) -> list[dict]:
    """The white-box audit of every site that ran gradient canaries in this run: its ε_lb against
    the proven ε of the DP-SGD steps the canaries went through (at the σ the site recorded).

    ``name_of(client_id)`` gives a site's ledger name, ``audit_epsilon(history, δ, accountant)``
    the auditor's ε. The 5 % is split over the sites, so an honest run is flagged with
    probability at most 5 % in all, whatever the number of sites."""
    sites = []
    for folder in sorted(Path(partition_dir).glob("client-*"), key=lambda f: int(f.name.split("-")[1])):
        state = folder / "state" / run_name
        rounds = sorted((state / "gradient-canaries").glob("round-*.npy"))
        if (folder / "gradient-canaries.json").is_file() and rounds:
            sites.append((folder, state, rounds))
    results = []
    for folder, state, rounds in sites:
        included = np.array(json.loads((folder / "gradient-canaries.json").read_text())["included"], dtype=bool)
        x = np.concatenate([np.load(r) for r in rounds])
        accountant = json.loads((state / "accountant.json").read_text())
        dp_sgd = tuple(tuple(h) for h in accountant["history"] if h[1] < 1.0)
        sigma, q = dp_sgd[0][0], dp_sgd[0][1]
        result = audit_scores(gradient_canary_scores(x, q, sigma), included, accountant["delta"], len(sites))
        proven = audit_epsilon(dp_sgd, accountant["delta"], accountant["accountant"])
        client_id = (state / "client-id").read_text().strip()
        results.append({**result, "site": folder.name, "node": name_of(client_id), "steps": len(x),
                        "recorded-sigma": sigma, "sample-rate": q, "proven-epsilon": proven,
                        "below-proven": result["epsilon-lb"] <= proven})
    return results
