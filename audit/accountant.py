"""The auditor's own accountant: every ε recomputed with code the audited party does not run.

A release history is a list of (σ, q, steps): ``steps`` Poisson-subsampled Gaussian mechanisms at
rate q with noise multiplier σ (DP-SGD), or, at q = 1, one Gaussian mechanism whose noise is σ
times its L2 sensitivity (a histogram, a count, evaluation sums). All compose adaptively.

The parties account with other libraries, so the auditor takes the one they do not use:

* a site accounts with **Opacus** (PRV by default, or RDP). The auditor uses Google's
  **dp-accounting**: for PRV, privacy-loss distributions (PLD), whose pessimistic estimate is
  an upper bound on ε(δ) (the auditor's ε) and whose optimistic estimate is a lower one (the
  band it prints beside it); for RDP, its RDP accountant over the same orders as the site's.
* the server's central DP accounts with **Flower's RdpAccountant**, which is dp-accounting
  inside. The auditor uses **Opacus'** RDP accountant.

Two numerical accountants differ by their error, never by more than a stated tolerance
(``tolerance``): a reported ε outside it is a finding of the audit.
"""

from __future__ import annotations

import functools
import warnings

History = tuple[tuple[float, float, int], ...]

# The site's RDP orders (Opacus' default list stops at 63, too low for small q and many steps):
# 1.1 to 10.9 by 0.1, 11 to 99, then up to 1,024.
RDP_ORDERS = tuple([1 + k / 10 for k in range(1, 100)] + list(range(11, 100)) + [128, 192, 256, 384, 512, 768, 1024])
# Opacus' PRV reports the upper end of its error bound, ε + eps_error with eps_error = 0.01; the
# PLD upper bound is within 1e-3 of the exact ε at this discretisation. A PRV report within
# twice that of the PLD bound agrees with it.
PRV_ABSOLUTE, PRV_RELATIVE = 0.02, 1e-3
# The two libraries compute the same RDP curve but convert it to (ε, δ) by different lemmas:
# 0.2 % apart on a user-level history (tests/test_user_level.py), 1e-8 on the default one.
RDP_RELATIVE = 1e-2
PLD_INTERVAL = 1e-3  # the upper bound's discretisation; the lower estimate needs 1e-4 to be tight


def tolerance(accountant: str, reference: float) -> float:
    """How far a reported ε may be from the auditor's ``reference`` for ``accountant``."""
    if accountant == "prv":
        return PRV_ABSOLUTE + PRV_RELATIVE * reference
    return RDP_RELATIVE * max(reference, 1e-12)


@functools.lru_cache(maxsize=4096)
def audit_epsilon(history: History, delta: float, accountant: str) -> float:
    """ε(δ) of ``history``, by the library the party that reported it (``accountant``) does not use."""
    if not history:
        return 0.0
    # One entry per mechanism, steps summed: the same composition, at a cost that grows with the
    # mechanisms a party used, not with its rounds (the server's ledger has a release a round).
    history = coalesce(history)
    if accountant == "prv":
        return pld_epsilon(history, delta, pessimistic=True)
    if accountant == "rdp":
        return dp_accounting_rdp(history, delta)
    if accountant == "flwr-rdp":
        return opacus_rdp(history, delta)
    raise ValueError(f"accountant {accountant!r}: the auditor knows prv, rdp (sites) and flwr-rdp (server)")


def coalesce(history: History) -> History:
    """``history`` with the releases of each mechanism (equal σ and q) as one entry, steps summed.
    Written here, not imported from ``common.privacy``, which sums the sites' own histories the
    same way: the auditor runs none of the audited parties' accounting code."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        steps[float(sigma), float(q)] = steps.get((float(sigma), float(q)), 0) + int(n)
    return tuple((sigma, q, n) for (sigma, q), n in steps.items())


@functools.lru_cache(maxsize=256)
def lower_estimate(history: History, delta: float, accountant: str) -> float:
    """The other end of the band: for PRV, dp-accounting's optimistic PLD estimate (a lower
    estimate of ε); for RDP, the same RDP value (RDP has no lower estimate)."""
    if accountant == "prv" and history:
        return pld_epsilon(coalesce(history), delta, pessimistic=False)
    return audit_epsilon(history, delta, accountant)


def pld_epsilon(history: History, delta: float, pessimistic: bool) -> float:
    from dp_accounting.pld import privacy_loss_distribution as pld

    interval = PLD_INTERVAL if pessimistic else PLD_INTERVAL / 10
    total = None
    for sigma, q, steps in history:
        one = pld.from_gaussian_mechanism(
            float(sigma), sampling_prob=min(float(q), 1.0), value_discretization_interval=interval,
            pessimistic_estimate=pessimistic, use_connect_dots=pessimistic)  # connect-the-dots is upper-only
        one = one.self_compose(int(steps)) if int(steps) > 1 else one
        total = one if total is None else total.compose(one)
    return float(total.get_epsilon_for_delta(delta))


def dp_accounting_rdp(history: History, delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    for sigma, q, steps in history:
        gaussian = dp_event.GaussianDpEvent(float(sigma))
        step = gaussian if float(q) >= 1.0 else dp_event.PoissonSampledDpEvent(float(q), gaussian)
        accountant.compose(dp_event.SelfComposedDpEvent(step, int(steps)))
    return float(accountant.get_epsilon(delta))


def opacus_rdp(history: History, delta: float) -> float:
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        # Flower's accountant optimises over dp-accounting's default orders: the same orders here.
        return float(accountant.get_epsilon(delta=delta, alphas=list(DEFAULT_RDP_ORDERS)))
