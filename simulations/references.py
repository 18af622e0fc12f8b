"""The field's reference models on fedrec's exact split: RecBole's SASRec, GRU4Rec and BPR-MF.

    python -m simulations.references --out runs/references          # tune on validation, then 3 seeds
    python -m simulations.references --out runs/references --report-only
    python -m simulations.references --out runs/references --jobs 2   # two runs at once, a thread each

RecBole 1.2.1 pins clash with fedrec's (it needs numpy < 2, pandas < 2.2 and ray), so it runs
in its own environment, ``.venv-references`` beside ``.venv``, which this command creates with
pip the first time (torch first, the local CPU wheel) and then re-runs itself inside.

Same split: MovieLens-100K is grouped into user histories exactly as fedrec does
(``common.data.user_histories``: a stable sort by timestamp), and RecBole is given each
interaction's position in its user's history as the timestamp, so RecBole's leave-one-out
(``LS: valid_and_test``, time order) holds out the same validation and test item per user as
``common.data.leave_last_out``; the command checks that it does, user by user.

Same metric: the trained model's full score matrix is ranked by fedrec's own rule
(``common.metrics.target_ranks``: all 1,682 items, the user's earlier items excluded, ties
against the target), not by RecBole's evaluator.

Protocol: each model's grid below (its stated tuning budget) is trained with seed 0 and early
stopping on RecBole's validation NDCG@10; the configuration with the best validation
NDCG@10 (fedrec's rule) is then trained with seeds 0, 1, 2. The test split is scored only for
those final runs, once each, and the report says so. Results: ``references.json`` and
``references.md`` in ``--out``; every run is kept (``runs.jsonl``), so the command resumes, and a
run cut short resumes at its last validated epoch (``train_run``). Runs that do not depend on
each other (a grid's configurations, then the chosen one's seeds) can train side by side
(``--jobs``), each in its own process with cores/jobs torch threads; thread counts change the
order of floating-point sums, so a run's figures are those of its thread count. A run
recorded without its checkpoint (``runs.jsonl`` carried to another machine) is trained again when
its checkpoint is needed, with RecBole's ``reproducibility`` on, and must reproduce its recorded
validation figure to 1e-6, or the command stops and says so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = ROOT / ".venv-references"
PINS = ["recbole==1.2.1", "numpy==1.26.4", "pandas==2.1.4", "scipy==1.11.4", "scikit-learn==1.3.2", "rich"]
DATASET = "ml-100k-fedrec"
SEEDS = (0, 1, 2)
# Each model's tuning budget, seed 0, early stopping on validation NDCG@10: the dropout of the
# sequential models, embedding size and learning rate of BPR-MF.
GRIDS = {
    "SASRec": [{"hidden_dropout_prob": p, "attn_dropout_prob": p} for p in (0.2, 0.5)],
    "GRU4Rec": [{"dropout_prob": p} for p in (0.1, 0.3)],
    "BPR": [{"embedding_size": d, "learning_rate": lr} for d in (64, 128) for lr in (1e-3, 5e-3)],
}
# The sequential models' epoch budget: RecBole trains them on every prefix of every history
# (97,171 sequences of up to 50 items), and one SASRec epoch takes 3 to 4.5 minutes on 2 idle
# cores (an Intel Xeon, an AMD EPYC), so each run stops at 30 epochs, or after 3 without a better
# validation NDCG@10.
EPOCHS = {"SASRec": {"epochs": 30, "stopping_step": 3}, "GRU4Rec": {"epochs": 30, "stopping_step": 3}}
COMMON = {
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    "metrics": ["NDCG", "Hit"], "topk": [10], "valid_metric": "NDCG@10",
    "epochs": 100, "stopping_step": 5, "MAX_ITEM_LIST_LENGTH": 50, "eval_batch_size": 4096, "learning_rate": 1e-3,
    "use_gpu": False, "show_progress": False, "reproducibility": True, "worker": 0,
}


def ensure_env() -> Path:
    """``.venv-references`` with RecBole and its pins; returns its python."""
    python = ENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ENV)], check=True)
    marker = ENV / "fedrec-pins.txt"
    if not marker.exists() or marker.read_text() != "\n".join(PINS):
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PINS], check=True)
        marker.write_text("\n".join(PINS))
    return python


def write_split(folder: Path) -> dict[str, dict]:
    """RecBole's atomic file of fedrec's split, and fedrec's own held-out examples per user."""
    from common.data import leave_last_out, load_movielens, user_histories

    catalog, interactions = load_movielens()
    users = user_histories(interactions)
    (folder / DATASET).mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user, history in users.items():
        lines += [f"{user}\t{it.item_id}\t{position}" for position, it in enumerate(history)]
    (folder / DATASET / f"{DATASET}.inter").write_text("\n".join(lines) + "\n")
    _, valid, test = leave_last_out(users, catalog, 1)
    item_ids = [item.item_id for item in catalog.items]
    return {"items": item_ids,
            "valid": {ex.user: (ex.target, ex.seen) for ex in valid},
            "test": {ex.user: (ex.target, ex.seen) for ex in test}}


def recbole_setup(model_name: str, params: dict, seed: int, data: Path):
    """RecBole's config, dataset and loaders for one run (the same split every time)."""
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    negatives = {"train_neg_sample_args": None} if model_name != "BPR" else {}
    config = Config(model=model_name, dataset=DATASET, config_dict={
        **COMMON, **negatives, **EPOCHS.get(model_name, {}), **params, "seed": seed, "data_path": str(data),
        "checkpoint_dir": str(data.parent / "checkpoints")})
    init_seed(seed, True)
    dataset = create_dataset(config)
    return config, dataset, *data_preparation(config, dataset)


def train_run(model_name: str, params: dict, seed: int, data: Path, split: dict, checkpoint: Path) -> dict:
    """Train one RecBole model with early stopping on validation; fedrec's validation metrics.

    Resumable: after every validated epoch, the trainer's state (model, optimizer, epoch,
    early-stopping counter, best score) and every random generator's (torch, NumPy, Python, the
    training loader's shuffle) are saved in ``<checkpoint>.resume``; a run cut short continues
    from its last epoch with the same random streams, as the uninterrupted run would have."""
    import random

    import numpy as np
    import torch
    from recbole.utils import get_model, get_trainer

    config, dataset, train_data, valid_data, _ = recbole_setup(model_name, params, seed, data)
    model = get_model(model_name)(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
    resume = checkpoint.with_name(checkpoint.name + ".resume")
    spent, resumed = 0.0, []
    if resume.is_file():
        state = torch.load(resume, weights_only=False)  # RecBole's own resume_checkpoint predates weights_only
        trainer.start_epoch, trainer.cur_step = state["epoch"] + 1, state["cur_step"]
        trainer.best_valid_score = state["best_valid_score"]
        model.load_state_dict(state["state_dict"])
        model.load_other_parameter(state["other_parameter"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["random"])
        train_data.generator.set_state(state["rng"]["loader"])
        spent, resumed = state["seconds"], state["resumed"] + [trainer.start_epoch]
    trainer.saved_model_file = str(checkpoint)  # the best epoch's model, where RecBole saves it
    started = time.time()

    def save_resume_state(epoch: int, score: float) -> None:
        print(f"  {model_name} {params} seed {seed}, epoch {epoch}: RecBole's validation NDCG@10 {score:.4f}, best {trainer.best_valid_score:.4f}, "
              f"{spent + time.time() - started:.0f} s so far", flush=True)
        state = {"epoch": epoch, "cur_step": trainer.cur_step,
                 "best_valid_score": trainer.best_valid_score, "state_dict": model.state_dict(),
                 "other_parameter": model.other_parameter(), "optimizer": trainer.optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
                         "loader": train_data.generator.get_state()},
                 "seconds": spent + time.time() - started, "resumed": resumed}
        torch.save(state, resume.with_name(resume.name + ".tmp"))
        resume.with_name(resume.name + ".tmp").replace(resume)

    stopped = trainer.cur_step > trainer.stopping_step or trainer.start_epoch >= trainer.epochs
    if not stopped:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False, verbose=False, callback_fn=save_resume_state)
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    record = {"model": model_name, "params": params, "seed": seed, "train_seconds": spent + time.time() - started,
              "checkpoint": checkpoint.name, "resumed-at-epochs": resumed, "torch-threads": torch.get_num_threads(),
              "valid": fedrec_metrics(model, valid_data, dataset, split["valid"], split["items"])}
    resume.unlink(missing_ok=True)
    return record


def checkpoint_path(out: Path, model_name: str, params: dict, seed: int) -> Path:
    """Where a run keeps its best epoch's model (and ``.resume`` beside it): named by the run."""
    settings = "-".join(f"{k}={v}" for k, v in sorted(params.items()))
    return out / "checkpoints" / f"{model_name}-{settings}-seed{seed}.pth"


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def score_test(run: dict, data: Path, split: dict) -> dict:
    """The test split, read for a final configuration's trained model."""
    import torch
    from recbole.utils import get_model

    config, dataset, train_data, _, test_data = recbole_setup(run["model"], run["params"], run["seed"], data)
    model = get_model(run["model"])(config, train_data._dataset).to(config["device"])
    model.load_state_dict(torch.load(data.parent / "checkpoints" / run["checkpoint"], weights_only=False)["state_dict"])
    return fedrec_metrics(model, test_data, dataset, split["test"], split["items"])


def fedrec_metrics(model, loader, dataset, held_out: dict, item_ids: list[str]) -> dict:
    """Rank RecBole's scores by fedrec's rule; checks RecBole holds out fedrec's item."""
    import numpy as np
    import torch

    from common.metrics import metrics_from_ranks, target_ranks

    columns = torch.as_tensor(dataset.token2id("item_id", item_ids))  # catalog order -> RecBole id
    model.eval()
    ranks = []
    with torch.no_grad():
        for interaction, _, positive_u, positive_i in loader:
            scores = model.full_sort_predict(interaction).view(-1, dataset.item_num)[:, columns]
            tokens = np.atleast_1d(dataset.id2token("user_id", interaction["user_id"].view(-1)))
            targets = [held_out[str(u)][0] for u in tokens]
            recbole_targets = np.atleast_1d(dataset.id2token("item_id", positive_i.view(-1)))
            if sorted(item_ids[t] for t in targets) != sorted(str(t) for t in recbole_targets):
                raise SystemExit("RecBole's held-out items are not fedrec's: the split differs")
            seen = [held_out[str(u)][1] for u in tokens]
            ranks.append(target_ranks(scores, torch.as_tensor(targets), seen))
    ranks = torch.cat(ranks)
    if len(ranks) != len(held_out):
        raise SystemExit(f"RecBole scored {len(ranks)} users, fedrec holds out {len(held_out)}")
    return metrics_from_ranks(ranks)


def run_all(out: Path, models: list[str], jobs: int = 1) -> None:
    from rich.console import Console

    console = Console()
    data = out / "data"
    split = write_split(data)
    (out / "checkpoints").mkdir(exist_ok=True)
    runs_file = out / "runs.jsonl"
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()] if runs_file.exists() else []

    def save():
        runs_file.write_text("".join(json.dumps(r) + "\n" for r in runs))

    def recorded(model_name, params, seed):
        return next((r for r in runs if (r["model"], r["params"], r["seed"]) == (model_name, params, seed)), None)

    def trained(specs: list[tuple]) -> list[dict]:
        """The runs (model, params, seed), those not recorded yet trained, ``jobs`` at a time."""
        pending = [spec for spec in specs if recorded(*spec) is None]
        for model_name, params, seed in pending:
            console.print(f"[bold]{model_name}[/] {params} seed {seed}: training, early stopping on validation")
        calls = [(*spec, data, split, checkpoint_path(out, *spec)) for spec in pending]
        if jobs > 1 and len(calls) > 1:
            # one torch thread per core each: the runs share the machine instead of taking turns
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(jobs, len(calls)), mp_context=context, initializer=torch_threads,
                                     initargs=(max(1, (os.cpu_count() or 1) // jobs),)) as pool:
                finished = [pool.submit(train_run, *call) for call in calls]
                for future in as_completed(finished):
                    record(future.result())
        else:
            for call in calls:
                record(train_run(*call))
        return [recorded(*spec) for spec in specs]

    def record(r: dict) -> None:
        console.print(f"[bold]{r['model']}[/] {r['params']} seed {r['seed']}: valid NDCG@10 "
                      f"{r['valid']['ndcg@10']:.4f} ({r['train_seconds']:.0f} s)")
        runs.append(r)
        save()

    def ensure_checkpoint(r):
        """The run's checkpoint, trained again (to the recorded figure) if it is not here."""
        import torch

        if not (out / "checkpoints" / r["checkpoint"]).exists():
            console.print(f"[bold]{r['model']}[/] {r['params']} seed {r['seed']}: checkpoint missing, training again")
            threads = torch.get_num_threads()
            torch.set_num_threads(r.get("torch-threads", threads))  # the run's own: its sums' order
            again = train_run(r["model"], r["params"], r["seed"], data, split, out / "checkpoints" / r["checkpoint"])
            torch.set_num_threads(threads)
            if abs(again["valid"]["ndcg@10"] - r["valid"]["ndcg@10"]) > 1e-6:
                raise SystemExit(f"{r['model']} seed {r['seed']} did not reproduce its recorded validation NDCG@10 "
                                 f"({again['valid']['ndcg@10']:.6f} against {r['valid']['ndcg@10']:.6f})")

    def read_test(finals: list[dict]) -> None:
        for r in finals:
            if "test" not in r:
                ensure_checkpoint(r)
                console.print(f"[bold]{r['model']}[/] seed {r['seed']}: reading the test split "
                              f"(final configuration {r['params']})")
                r["test"] = score_test(r, data, split)
                console.print(f"  test NDCG@10 {r['test']['ndcg@10']:.4f}")
                save()

    for model_name in models:
        tuned = trained([(model_name, params, 0) for params in GRIDS[model_name]])
        best = max(tuned, key=lambda r: r["valid"]["ndcg@10"])["params"]
        finals = [(model_name, best, seed) for seed in SEEDS]
        # the grid's seed-0 run is a final run: its test now, while its checkpoint is here
        read_test([r for spec in finals if (r := recorded(*spec)) is not None])
        read_test(trained(finals))
    report(out)


def report(out: Path) -> dict:
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    summary = {}
    for model_name in GRIDS:
        final = [r for r in runs if r["model"] == model_name and "test" in r]
        if not final:
            continue
        row = {"params": final[0]["params"], "seeds": [r["seed"] for r in final],
               "tuned": len({json.dumps(r["params"], sort_keys=True) for r in runs
                             if r["model"] == model_name and r["seed"] == 0})}
        for split_name in ("valid", "test"):
            for metric in ("ndcg@10", "hr@10", "recall@20"):
                values = [r[split_name][metric] for r in final]
                row[f"{split_name} {metric}"] = [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
        summary[model_name] = row
    (out / "references.json").write_text(json.dumps(summary, indent=2))
    lines = ["| model (RecBole 1.2.1) | configurations tuned | chosen on validation | seeds | "
             "valid NDCG@10 | test NDCG@10 | test HR@10 | test Recall@20 |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, row in summary.items():
        one_seed = len(row["seeds"]) == 1  # no spread to state yet
        cell = lambda key: f"{row[key][0]:.4f}" if one_seed else f"{row[key][0]:.4f} ± {row[key][1]:.4f}"  # noqa: E731
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"| {name} | {row['tuned']} | {params} | {len(row['seeds'])} | {cell('valid ndcg@10')} | "
                     f"{cell('test ndcg@10')} | {cell('test hr@10')} | {cell('test recall@20')} |")
    (out / "references.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/references"))
    parser.add_argument("--models", nargs="*", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=1,
                        help="train up to this many independent runs at once (a grid's configurations, the seeds), "
                             "each with cores/jobs torch threads")
    parser.add_argument("--in-env", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report(args.out)
    elif args.in_env:
        run_all(args.out.resolve(), args.models, args.jobs)
    else:
        python = ensure_env()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [str(python), "-m", "simulations.references", "--in-env", "--out", str(args.out.resolve()),
                   "--models", *args.models, "--jobs", str(args.jobs)]
        # RecBole writes its logs and TensorBoard files into the working directory: --out.
        sys.exit(subprocess.run(command, env=env, cwd=args.out.resolve()).returncode)


if __name__ == "__main__":
    main()
