"""Split a dataset into federated clients, written in the fedrec client data format.

The partitioner plays the part of the users producing the data: it writes

    <root>/catalog.csv                 the public catalog
    <root>/client-<k>/interactions.csv client k's private data (same format as a deployment)
    <root>/client-<k>/budget.json      client k's own privacy budget (client-epsilon-max, delta) and
                                       declared-examples and declared-users (the split's means per client, public)
    <root>/reference.json              the popularity baseline on the same split
    <root>/audit-canaries.json         with ``canaries`` > 0: the planted canaries and which
                                       were included (the auditor's secret; see audit/empirical.py)
    <root>/client-<k>/gradient-canaries.json  with ``gradient-canaries`` = m > 0: the seed of the site's m
                                       white-box DP-SGD canaries and which are included (client/train.py)

Schemes:
* ``user``: one client per user (cross-device); the number of clients must equal the
  number of users.
* ``silo``: K silos of many users (cross-silo). ``skew_alpha`` = 0 splits users IID;
  ``skew_alpha`` > 0 gives each silo a Dirichlet(α) share of every genre, where a user's
  genre is the most frequent genre in their history (small α = strongly skewed silos).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from common.config import partition_root, simulated_budget
from common.data import (
    Catalog,
    Interaction,
    leave_last_out,
    load_movielens,
    user_histories,
    write_catalog,
    write_interactions,
)
from common.metrics import metrics_from_ranks, popularity_scores, target_ranks
from common.privacy import Budget, write_budget
from common.model import resolve_model_path
from audit.empirical import CANARY_FILE, canary_interactions, make_canaries, phrase_words
from client.train import GradientCanaries


def select_users(interactions: list[Interaction], max_users: int, seed: int) -> dict[str, list[Interaction]]:
    users = user_histories(interactions)
    ids = list(users)
    if max_users and max_users < len(ids):
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(ids, size=max_users, replace=False).tolist(), key=ids.index)
    return {u: users[u] for u in ids}


def assign(users: dict[str, list[Interaction]], catalog: Catalog, scheme: str, num_clients: int,
           alpha: float, seed: int) -> list[list[str]]:
    """User ids of each client."""
    ids = list(users)
    if scheme == "user":
        if num_clients != len(ids):
            raise ValueError(f"partition=user needs one client per user: {len(ids)} users, {num_clients} clients")
        return [[u] for u in ids]
    if num_clients > len(ids):
        raise ValueError(f"partition=silo: {num_clients} silos but only {len(ids)} users")
    rng = np.random.default_rng(seed)
    if alpha == 0:
        order = rng.permutation(len(ids))
        return [[ids[i] for i in sorted(part)] for part in np.array_split(order, num_clients)]
    genre_of = {}
    for u in ids:
        counts = Counter(g for it in users[u] for g in catalog.items[catalog.index[it.item_id]].genres)
        genre_of[u] = counts.most_common(1)[0][0] if counts else "unknown"
    silos: list[list[str]] = [[] for _ in range(num_clients)]
    for genre in sorted(set(genre_of.values())):
        members = [u for u in ids if genre_of[u] == genre]
        rng.shuffle(members)
        shares = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for k, part in enumerate(np.split(np.array(members, dtype=object), cuts)):
            silos[k].extend(part.tolist())
    # Every silo needs at least one user; move one from the largest where one is empty.
    for k in range(num_clients):
        if not silos[k]:
            donor = max(range(num_clients), key=lambda j: len(silos[j]))
            silos[k].append(silos[donor].pop())
    return [sorted(s, key=ids.index) for s in silos]


def popularity_model(users: dict[str, list[Interaction]], catalog: Catalog) -> torch.Tensor:
    """Item scores of the popularity baseline: training-interaction counts (held-out items excluded)."""
    train_items = []
    for history in users.values():
        keep = history[:-2] if len(history) >= 3 else history
        train_items.extend(catalog.index[it.item_id] for it in keep)
    return popularity_scores(train_items, len(catalog))


def popularity_reference(users: dict[str, list[Interaction]], catalog: Catalog, history_len: int) -> dict:
    """Popularity baseline on the leave-last-out split: items ranked by training count."""
    _, valid, test = leave_last_out(users, catalog, history_len)
    scores = popularity_model(users, catalog)

    def evaluate(examples):
        s = scores.expand(len(examples), -1)
        targets = torch.tensor([ex.target for ex in examples])
        return metrics_from_ranks(target_ranks(s, targets, [ex.seen for ex in examples]))

    return {"test": evaluate(test), "valid": evaluate(valid), "users": len(test)}


def materialize(s, num_clients: int) -> Path:
    """Write the partition for settings ``s`` once (atomic, safe under concurrent callers)."""
    root = partition_root(s, num_clients)
    if (root / "reference.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "reference.json").is_file():
            return root
        catalog, interactions = load_movielens(s.dataset or None)
        users = select_users(interactions, s.max_users, s.seed)
        clients = assign(users, catalog, s.partition, num_clients, s.skew_alpha, s.seed)
        tmp = root.parent / f".{root.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_catalog(catalog, tmp / "catalog.csv")
        eps_max, delta = simulated_budget(s)
        # The sizes every simulated site declares (q = batch-size / declared-examples or
        # declared-users): the split's mean training examples and users per client, one public
        # figure each for all, never a site's own count.
        declared = max(1, round(len(leave_last_out(users, catalog, s.history_len)[0]) / num_clients))
        declared_users = max(1, round(len(users) / num_clients))
        canaries = (make_canaries(catalog, s.canaries, num_clients, phrase_words(resolve_model_path(s.model)),
                                  s.canary_examples) if s.canaries else [])
        for k, ids in enumerate(clients):
            planted = [it for c in canaries if c["client"] == k and c["included"] for it in canary_interactions(c)]
            write_interactions([it for u in ids for it in users[u]] + planted, tmp / f"client-{k}")
            write_budget(tmp / f"client-{k}", Budget(math.inf if eps_max is None else eps_max, delta,
                                                      declared_examples=declared, declared_users=declared_users,
                                                      # the simulator plays every site: all trust one another
                                                      distributed_noise_max_sites=max(2, num_clients)))
            if s.gradient_canaries:  # the auditor's secret, on the site's side: the seed and who is in
                (tmp / f"client-{k}" / GradientCanaries.FILE).write_text(json.dumps(
                    {"seed": secrets.token_hex(16), "included": [secrets.randbits(1) == 1
                                                                 for _ in range(s.gradient_canaries)]}))
        reference = popularity_reference(users, catalog, s.history_len)
        reference.update({"clients": num_clients, "scheme": s.partition, "skew-alpha": s.skew_alpha,
                          "users-per-client": [len(ids) for ids in clients]})
        (tmp / "reference.json").write_text(json.dumps(reference, indent=1))
        if canaries:
            (tmp / CANARY_FILE).write_text(json.dumps({"canaries": canaries}, indent=1))
        if root.exists():
            if any(root.iterdir()):
                shutil.rmtree(tmp)
                raise ValueError(f"partition-dir: {root} exists and is not a fedrec partition "
                                 "(no reference.json); choose an empty or new folder")
            root.rmdir()
        os.replace(tmp, root)
    return root


def main(argv: list[str] | None = None) -> Path:
    """Write the partition a simulation with these settings reads (``flwr run .`` needs it first)."""
    import argparse

    from common.config import Settings, defaults, parse_overrides

    parser = argparse.ArgumentParser(description="write the simulated sites' data folders")
    parser.add_argument("--clients", type=int, default=10, help="the federation's number of SuperNodes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the run config of the run")
    args = parser.parse_args(argv)
    root = materialize(Settings.from_run_config({**defaults(), **parse_overrides(args.set)}), args.clients)
    print(root)
    return root


if __name__ == "__main__":
    main()
