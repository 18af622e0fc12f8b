"""How often the white-box canary audit flags an honest site, and how often it catches a liar.

    python -m simulations.canary_power                       # the default run's size
    python -m simulations.canary_power --steps 40 --sample-rate 0.02 --canaries 600 --sites 3

A real run gives one verdict per site; a false-alarm rate needs thousands. So this replays the
audit's own scoring and bound (audit/empirical.py) on the observations the mechanism itself
produces, many times: each of m canaries is included with probability ½, an included one joins
each of T steps with probability q, and a step's observation along its direction is
[joined] + N(0, σ_added²), the site having recorded σ. (A real run adds the projection of the
data's clipped gradients, about ‖Σ g‖/√d, which only blurs the scores.) A site is flagged when
its ε_lb exceeds the proven ε of its T steps at the recorded σ (the auditor's dp-accounting PLD),
as ``fedrec audit --empirical`` flags it.
"""

from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from audit.accountant import audit_epsilon
from audit.empirical import audit_scores, gradient_canary_scores


def flagged(rng, m: int, steps: int, q: float, sigma: float, added: float, sites: int, proven: float) -> bool:
    included = rng.random(m) < 0.5
    joined = included & (rng.random((steps, m)) < q)
    x = joined + added * rng.standard_normal((steps, m))
    result = audit_scores(gradient_canary_scores(x, q, sigma), included, 1e-5, sites)
    return result["epsilon-lb"] > proven


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200, help="DP-SGD steps the canaries go through (5 × 40)")
    parser.add_argument("--sample-rate", type=float, default=0.006586, help="q (64 / 9,717 declared examples)")
    parser.add_argument("--sigma", type=float, default=1.0, help="the σ the site records")
    parser.add_argument("--sites", type=int, default=10, help="sites audited together (the 5 %% is split)")
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    proven = audit_epsilon(((args.sigma, args.sample_rate, args.steps),), 1e-5, "prv")
    table = Table(title=f"White-box canary audit: sites flagged, {args.trials} trials each "
                        f"(m = {args.canaries}, T = {args.steps}, q = {args.sample_rate:g}, recorded σ = "
                        f"{args.sigma:g}, proven ε = {proven:.3f}, example-level, δ = 1e-5, dp-accounting PLD; "
                        f"{args.sites} sites share the 5 %)")
    for column in ("noise really added", "flagged", "rate"):
        table.add_column(column, justify="right")
    rates = {}
    for added in (args.sigma, 0.3 * args.sigma, 0.0):
        hits = sum(flagged(rng, args.canaries, args.steps, args.sample_rate, args.sigma, added, args.sites, proven)
                   for _ in track(range(args.trials), description=f"σ added {added:g}"))
        rates[added] = hits / args.trials
        table.add_row(f"σ·{added / args.sigma:g}", f"{hits}/{args.trials}", f"{hits / args.trials:.3f}")
    Console().print(table)
    return {"proven-epsilon": proven, "flag-rate": rates}


if __name__ == "__main__":
    main()
