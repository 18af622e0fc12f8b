"""Where ε is computed: example-level DP-SGD accounting, persisted across rounds.

Mechanism: each optimizer step is the Poisson-subsampled Gaussian mechanism — every
example joins the batch independently with probability q, each per-example gradient is
clipped to L2 norm C, and N(0, σ²C²) noise is added to their sum (Opacus DP-SGD).

Unit of privacy (``privacy-unit``, one per site accountant):

* ``example``: one training example of one site (one user-history window → next item),
  add/remove adjacency. This is not a per-rating guarantee: a rating is the target of one
  example, appears in the history text of the next ``history-len`` ones, and is masked out of
  the softmax of *every* later example of its user (``Example.seen``), so the group one rating
  touches is up to the user's whole example count (20 to 737 in MovieLens-100K), and per-user
  statements follow only by group privacy over that many examples, which is vacuous.
* ``user``: all the data of one person at one site (every training example, and the
  validation and test items), add/remove adjacency. DP-SGD samples *users* (user-level
  sampling, ULS: Charles et al. 2024), each sampled user's gradient is the mean of at most
  ``examples-per-user`` of its examples' gradients and is clipped as one; every other release
  bounds what one user adds to it (``common/releases.py``).

A site's accountant holds releases of one unit only: a user-level ε and an example-level ε
bound different things and are never composed as one (``unit_conflict``).

Every release a site makes is one entry of its accountant history, (σ, q, steps): DP-SGD
rounds (q < 1, public q), and Gaussian releases with q = 1 and one step whose noise is
σ times their L2 sensitivity (the popularity histogram, the noisy example count, the
evaluation sums; ``common/releases.py`` lists them all). The history is stored in the
site's own state directory for the site's lifetime and every run composes with it, so ε is
cumulative, never per round or per run. ε is computed by Opacus' accountant for a fixed δ:
PRV by default (a tight numerical accountant; its ε is the upper end of its error bound),
or RDP over orders up to 1,024.
"""

from __future__ import annotations

import functools

import json
import math
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy
from opacus.accountants import create_accountant

from common.units import UNITS

History = list[tuple[float, float, int]]  # (noise multiplier σ, sample rate q, steps)

# Opacus' default RDP orders stop at 63, and for small q and many steps the best order is the
# largest one (Opacus warns): the ε it then prints is looser than RDP itself gives.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 100)) + [128, 192, 256, 384, 512, 768, 1024]


def epsilon(history: History, delta: float, accountant: str = "prv") -> float:
    """ε(δ) of the composition of all releases in ``history`` (0 if nothing has run).

    Releases of one mechanism (equal σ and q) are handed to the accountant as one entry with
    their steps summed. Composition does not depend on order, so this is the same guarantee; it
    keeps the accountant's work proportional to the distinct mechanisms a site uses (a few), not
    to its lifetime of rounds (a site alternates DP-SGD, count and evaluation releases)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[float(sigma), float(q)] = steps.get((float(sigma), float(q)), 0) + int(n)
    return _epsilon(tuple((sigma, q, n) for (sigma, q), n in steps.items()), float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _epsilon(history: tuple, delta: float, accountant: str) -> float:
    # Memoised, as a pure function of its arguments: a PRV computation takes about a second, and
    # a process asks for the same history many times (a site's checks before and after a release,
    # and in a simulation every silo with the same declared size has the same history).
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = list(history)
    if accountant == "rdp":
        return float(acc.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    with warnings.catch_warnings(), numpy.errstate(divide="ignore"):
        # PRV sizes its grid with an RDP bound (Opacus warns about that bound's orders) and takes
        # log(1 − q), −inf for the q = 1 releases; neither affects the ε it returns.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def load_history(state_dir: Path) -> History:
    path = Path(state_dir) / "accountant.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [tuple(step) for step in data["history"]]


def history_unit(state_dir: Path) -> str | None:
    """The privacy unit of the site's stored releases (None before the first one). Files from
    before the setting existed hold example-level releases: that was the only unit."""
    path = Path(state_dir) / "accountant.json"
    if not path.is_file() or not load_history(state_dir):
        return None
    return json.loads(path.read_text()).get("privacy-unit", "example")


RELEASE_LOG = "releases.jsonl"


def save_history(state_dir: Path, history: History, accountant: str, delta: float, unit: str,
                 released: list[dict] = ()) -> float:
    """Atomically replace the stored history (a crash never leaves a half-written file); its ε.

    ``released`` describes the history's last ``len(released)`` entries, the releases just made
    (run, round, phase, mechanism, σ, q, steps, sensitivity); each becomes a line of the site's
    own release log, ``releases.jsonl``, with its index in the history and the ε after the reply
    (``epsilon-after``, covering the history's first ``covers`` entries), so
    the site can see what it released, to whom and at what cost (``fedrec client audit``). The
    lines are stored in the accountant with the charge (``last-releases``, one atomic write),
    then appended to the log: a crash between the two leaves them in the accountant, and the
    next call appends them before anything else, so the log never misses a charged release
    for long and never holds an uncharged one."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    complete_release_log(state_dir)
    eps = epsilon(history, delta, accountant)
    first = len(history) - len(released)
    rows = [{"index": index, "at": time.time(), **release, "epsilon-after": eps, "covers": len(history),
             "delta": delta, "accountant": accountant, "privacy-unit": unit}
            for index, release in enumerate(released, start=first)]
    tmp = state_dir / "accountant.json.tmp"
    tmp.write_text(json.dumps({
        "accountant": accountant,
        "delta": delta,
        "privacy-unit": unit,
        "unit": UNITS[unit],
        "history": [list(step) for step in history],
        "epsilon": eps,
        "last-releases": rows,
    }, indent=1))
    os.replace(tmp, state_dir / "accountant.json")
    append_release_log(state_dir, rows)
    return eps


def append_release_log(state_dir: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(Path(state_dir) / RELEASE_LOG, "a") as log:
        for row in rows:
            log.write(json.dumps(row) + "\n")
        log.flush()
        os.fsync(log.fileno())


def complete_release_log(state_dir: Path) -> None:
    """Append the stored accountant's last releases that the log lacks (a crash came between
    the two writes of ``save_history``)."""
    path = Path(state_dir) / "accountant.json"
    if not path.is_file():
        return
    last = json.loads(path.read_text()).get("last-releases", [])
    log = Path(state_dir) / RELEASE_LOG
    logged = {json.loads(line)["index"] for line in log.read_text().splitlines() if line.strip()} if log.is_file() else set()
    append_release_log(state_dir, [row for row in last if row["index"] not in logged])


@dataclass(frozen=True)
class Budget:
    """A client's own privacy budget: it never lets its ε at ``delta`` pass ``epsilon_max``.

    It comes from the client's side only — ``--node-config "epsilon-max=… delta=…"`` or
    ``budget.json`` in its data directory — so nothing the server sends can raise it.
    ``epsilon_max = inf`` (JSON ``null``) is "no limit", which only a non-private run needs.

    ``declared_examples`` and ``declared_users`` are the sizes the site chooses to make public
    (``declared-examples``, ``declared-users``): DP-SGD samples at q = batch-size / declared size
    of its privacy unit, so q never depends on the private count (add/remove accounting needs q
    fixed in advance). A site with more than it declares trains with larger batches than
    ``batch-size``; the guarantee holds either way. ``privacy_unit``, when the site sets it, is
    the only unit it releases at.

    ``distributed_noise_max_sites`` (``distributed-noise-max-sites``) is the largest number of
    sites T the site shares DP-SGD's noise with (``distributed-noise``): in such a round it adds
    σ/√T and charges σ, which holds only if SecAgg+'s sum has at least T honest sites in it. So
    its own share alone never carries less than σ/√(this number). Not set: the site takes no
    distributed-noise round.
    """

    epsilon_max: float
    delta: float
    source: str = ""
    declared_examples: int | None = None
    declared_users: int | None = None
    privacy_unit: str | None = None
    distributed_noise_max_sites: int | None = None


BUDGET_FILE = "budget.json"


class BudgetError(ValueError):
    """The client's budget is missing or malformed; the message names where it was read."""


BUDGET_KEYS = ("epsilon-max", "delta", "declared-examples", "declared-users", "privacy-unit",
               "distributed-noise-max-sites")


def read_budget(data_dir: Path, node_config: dict) -> Budget:
    """The node's budget: ``budget.json`` in its data folder, with any of its keys
    (``BUDGET_KEYS``) set in the node config taking precedence."""
    raw, sources = {}, []
    path = Path(data_dir) / BUDGET_FILE
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BudgetError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise BudgetError(f"{path}: expected an object with epsilon-max and delta")
        sources.append(str(path))
    node = {k: node_config[k] for k in BUDGET_KEYS if k in node_config}
    if node:
        raw = {**raw, **node}
        sources.append("node-config")
    source = " and ".join(sources)
    if "epsilon-max" not in raw:
        raise BudgetError(f"{path}: no privacy budget. Write {{\"epsilon-max\": 8.0, \"delta\": 1e-5, "
                          "\"declared-examples\": 5000, \"declared-users\": 100}} there or start the node with "
                          "--node-config \"epsilon-max=8.0 delta=1e-5 declared-examples=5000 declared-users=100\"")
    eps, delta = raw.get("epsilon-max"), raw.get("delta")
    eps = math.inf if eps is None else eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise BudgetError(f"{source}: epsilon-max must be a number > 0 (or null for no limit), got {eps!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise BudgetError(f"{source}: delta must be a number in (0, 1), got {delta!r}")
    for key in ("declared-examples", "declared-users"):
        declared = raw.get(key)
        if declared is not None and (isinstance(declared, bool) or not isinstance(declared, int) or declared < 1):
            raise BudgetError(f"{source}: {key} must be a whole number >= 1 (a site size it makes public), "
                              f"got {declared!r}")
    unit = raw.get("privacy-unit")
    if unit is not None and unit not in UNITS:
        raise BudgetError(f"{source}: privacy-unit must be one of {', '.join(UNITS)}, got {unit!r}")
    sites = raw.get("distributed-noise-max-sites")
    if sites is not None and (isinstance(sites, bool) or not isinstance(sites, int) or sites < 2):
        raise BudgetError(f"{source}: distributed-noise-max-sites must be a whole number >= 2 (the most sites this "
                          f"site shares its noise with), got {sites!r}")
    return Budget(float(eps), float(delta), source, raw.get("declared-examples"), raw.get("declared-users"), unit,
                  sites)


def write_budget(data_dir: Path, budget: Budget) -> None:
    eps = None if math.isinf(budget.epsilon_max) else budget.epsilon_max
    record = {"epsilon-max": eps, "delta": budget.delta, "declared-examples": budget.declared_examples,
              "declared-users": budget.declared_users, "privacy-unit": budget.privacy_unit,
              "distributed-noise-max-sites": budget.distributed_noise_max_sites}
    record = {k: v for k, v in record.items() if v is not None or k == "epsilon-max"}
    (Path(data_dir) / BUDGET_FILE).write_text(json.dumps(record) + "\n")


def public_sample_rate(batch_size: int, budget: Budget, unit: str = "example") -> float:
    """DP-SGD's Poisson rate from public numbers only: q = min(1, batch-size / declared size),
    the size being the site's declared examples or users, as its privacy unit samples.

    There is no default: any default would have to come from the private count."""
    key = "declared-examples" if unit == "example" else "declared-users"
    declared = budget.declared_examples if unit == "example" else budget.declared_users
    if declared is None:
        raise BudgetError(f"{budget.source}: {key} is not set; {unit}-level DP-SGD samples {unit}s at "
                          f"q = batch-size / {key}, which must come from a size the site makes public")
    return min(1.0, batch_size / declared)


def unit_conflict(unit: str, budget: Budget, state_dir: Path) -> str | None:
    """Why this site must refuse releases at ``unit``, or None: its budget names another unit, or
    its accountant already holds releases of another unit (they would not compose as one ε)."""
    if budget.privacy_unit not in (None, unit):
        return (f"budget: this site releases at the {budget.privacy_unit} level only ({budget.source} "
                f"privacy-unit), and the run asks for {unit}-level DP")
    held = history_unit(state_dir)
    if held not in (None, unit):
        return (f"budget: this site's accountant holds {held}-level releases, and {unit}-level ones cannot be "
                f"composed with them as one ε; a site that means to switch starts a new accountant with "
                f"`fedrec client reset-accountant` (the old one is kept and logged)")
    return None


def spend(history: History, releases: list[tuple[float, float, int]], budget: Budget,
          accountant: str = "prv") -> tuple[bool, float]:
    """Whether making ``releases`` (each (σ, q, steps)) keeps ε(δ) within the budget, and the ε after them.

    The check runs before any private data is touched, on the same accountant that records
    the run, so a client never ends above ``epsilon_max``.
    """
    after = epsilon(list(history) + list(releases), budget.delta, accountant)
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


def statement(eps: float, delta: float, accountant: str, unit: str) -> str:
    return f"(ε = {eps:.3f}, δ = {delta:g})-DP, {UNITS[unit]}, {accountant.upper()} accountant"


ACCOUNTANT_LOG = "accountant-log.jsonl"


def retire_accountant(state_dir: Path, reason: str) -> Path | None:
    """Start a new accountant for this site: the one explicit, local way to do it, and logged.

    The old ``accountant.json`` is kept beside it (``accountant-retired-<time>.json``, and its
    release log as ``releases-retired-<time>.jsonl``) and
    ``accountant-log.jsonl`` records when, why and at which ε. Nothing a server sends calls this.
    """
    state_dir = Path(state_dir)
    current = state_dir / "accountant.json"
    retired = None
    complete_release_log(state_dir)  # the retired log describes every release it charged
    if current.is_file():
        stamp = time.strftime('%Y%m%dT%H%M%S')
        retired = state_dir / f"accountant-retired-{stamp}.json"
        os.replace(current, retired)
        if (state_dir / RELEASE_LOG).is_file():
            os.replace(state_dir / RELEASE_LOG, state_dir / f"releases-retired-{stamp}.jsonl")
    state_dir.mkdir(parents=True, exist_ok=True)
    old = json.loads(retired.read_text()) if retired else {}
    with open(state_dir / ACCOUNTANT_LOG, "a") as f:
        f.write(json.dumps({"at": time.time(), "action": "new accountant", "reason": reason,
                            "retired": str(retired) if retired else None, "retired-epsilon": old.get("epsilon"),
                            "retired-delta": old.get("delta"), "retired-accountant": old.get("accountant")}) + "\n")
    return retired
