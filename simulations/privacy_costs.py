"""What each release of a site costs on a simulated run, alone and composed.

    python -m simulations.privacy_costs                      # the default run
    python -m simulations.privacy_costs --clients 20 --set num-server-rounds=10 eval-noise-multiplier=100

Every site of a simulation makes the same public releases (q is public: ``batch-size`` / the
split's mean examples per client, what the partitioner declares), so one history stands for
all: the popularity histogram once, then per round DP-SGD, the noisy example count and the
noisy evaluation sums. ε is printed by the run's accountant and by the others beside it.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from audit.accountant import audit_epsilon
from common.config import Settings, defaults, parse_overrides
from common.data import leave_last_out, load_movielens
from common.privacy import epsilon
from simulations.partition import select_users


def releases(s: Settings, clients: int) -> dict[str, list[tuple[float, float, int]]]:
    catalog, interactions = load_movielens(s.dataset or None)
    train, _, _ = leave_last_out(select_users(interactions, s.max_users, s.seed), catalog, s.history_len)
    q = min(1.0, s.batch_size / max(1, round(len(train) / clients)))
    rounds = s.num_server_rounds
    return {
        "popularity histogram": [(s.prior_noise_multiplier, 1.0, 1)] if s.popularity_prior else [],
        "adapters (DP-SGD)": [(s.noise_multiplier, q, s.local_steps)] * rounds,
        "example counts": [(s.count_noise_multiplier, 1.0, 1)] * rounds,
        "evaluation sums": [(s.eval_noise_multiplier, 1.0, 1)] * rounds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    s = Settings.from_run_config({**defaults(), **parse_overrides(args.set)})
    parts = releases(s, args.clients)
    everything = [r for history in parts.values() for r in history]
    table = Table(title=f"ε per site at δ = {s.delta:g}, example-level, {args.clients} clients, "
                        f"{s.num_server_rounds} rounds")
    for column in ("release", "(σ, q, steps) × n", f"{s.accountant.upper()} (run's)", "other accountants"):
        table.add_column(column, justify="right")
    figures = {}
    for name, history in list(parts.items()) + [("all of it, composed", everything)]:
        if not history:
            continue
        figures[name] = {"prv": epsilon(history, s.delta, "prv"), "rdp": epsilon(history, s.delta, "rdp"),
                         "pld": audit_epsilon(tuple(history), s.delta, "prv")}
        others = {k: v for k, v in figures[name].items() if k != s.accountant}
        sigma, q, steps = history[0]
        table.add_row(name, f"({sigma:g}, {q:.4g}, {steps}) × {len(history)}" if name in parts else "",
                      f"{figures[name][s.accountant]:.3f}", ", ".join(f"{k.upper()} {v:.3f}" for k, v in others.items()))
    Console().print(table)
    return figures


if __name__ == "__main__":
    main()
