"""Where the time goes: fedrec's costs measured side by side, on the same inputs, on this machine.

    python -m simulations.bench                  # writes BENCHMARKS.md and runs/bench/bench.json
    python -m simulations.bench --simulate       # and three default `fedrec simulate` runs (below)
    python -m simulations.bench --simulate-only  # the default run and the same with float32 products

Every case runs the default model (all-MiniLM-L6-v2, 6 layers, LoRA on the top 2) on one silo
of MovieLens-100K (94 users, the first of the 10-silo partition's size), with one torch thread,
as one Ray worker runs one client. A case runs in a fresh process, so its peak memory (the
process's peak RSS after the work minus after loading) is its own. Figures are medians over
``--repeats``, with min–max.

* step: local_steps of DP-SGD (Poisson rate 64 / declared examples, σ = 1, C = 1) against plain
  Adam on batches of 64, with the frozen-prefix cache off, and on and warm (every training text
  of the site already cached: the steady state from a site's second round on). "warm-up" is
  what filling it costs once: the frozen lower layers over each distinct training text;
* same batches: non-DP, DP as fedrec runs it, DP as plain Opacus runs it and DP with ghost
  clipping on the same fixed batches of 64, cache warm, taking turns in one process; each step's
  time and its own peak memory (the kernel's peak-RSS count restarted at the step's start),
  compared batch by batch. The step cases above draw Poisson batches for DP, run apart and peak
  in their encoding, so they are no close comparison. Non-DP and DP also take their turns as
  before two changes: with the adapted layers' frozen products in float32
  (``frozen-precision``; the default is bfloat16 where the CPU has it), and on top of that with
  the adapted layers run on the padded batch, as before they skipped padding (before and after,
  side by side); and with LoRA's A frozen (``lora-train-a = false``, FFA-LoRA), which halves the
  per-sample work. Plain Opacus: GradSampleModule's hooks on every trained module, its own
  nn.Linear grad sampler, and autograd also summing the LoRA weights' gradients that DPOptimizer
  discards; fedrec's ``client.train.per_sample_gradients`` computes the linear maps' per-sample
  gradients in their own backward instead;
* DP against non-DP alone: the two take turns on ``--pair-batches`` batches (256 by default):
  the per-batch ratios' median and quartiles, and the ratio of the two total times with a 95 %
  bootstrap interval (resampling batches), tighter than the rotation among every kind above;
* catalog refresh: the 1,682 item texts through the encoder, cache off / cold / warm, and warm
  with float32 products and with the adapted layers padded;
* full-ranking evaluation: all 943 users' test examples over all 1,682 items (the same cases);
* bytes on the wire: the adapter tensors a client sends per round against the full fp32 model;
* ``--simulate``: the default ``fedrec simulate``, the same with float32 frozen products, and
  the same with the cache off, one after the other, each in a fresh ``FEDREC_HOME``. Without
  it, the report shows the runs of the last ``--simulate-only`` (OUT/simulate.json), saying when
  and where they ran.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
SITE_USERS = 94


def setup(cache_mb: int, users: int = SITE_USERS):
    import torch

    from common.config import Settings, defaults
    from common.data import leave_last_out, load_movielens
    from common.model import adapter_config, build_model, load_encoder
    from simulations.partition import select_users

    torch.set_num_threads(1)
    s = dataclasses.replace(Settings.from_run_config(defaults()), prefix_cache_mb=cache_mb)
    catalog, interactions = load_movielens()
    train, _, test = leave_last_out(select_users(interactions, users, s.seed), catalog, s.history_len)
    encoder, tokenizer = load_encoder(s.model, s.model_layers)
    model = build_model(encoder, len(catalog), adapter_config(s, encoder), prefix_cache_mb=cache_mb,
                        frozen_precision=s.frozen_precision)
    return s, catalog, train, test, model, tokenizer


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> list[float]:
    import torch

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():  # CUDA runs asynchronously: wait for it before reading the clock
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def step_case(dp: bool, cache: bool, steps: int, repeats: int) -> dict:
    """Seconds per step of ``train`` (median over repeats of ``steps`` steps) and peak memory."""
    import torch

    from client.train import train
    from common.model import refresh_item_embeddings, text_inputs

    s, catalog, examples, _, model, tokenizer = setup(1024 if cache else 0)
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    warm_up = None
    if cache:
        texts = sorted({ex.text for ex in examples})
        warm_up = timed(lambda: text_inputs(model, tokenizer, texts, s.max_length), 1)[0]
    s = dataclasses.replace(s, dp=dp, local_steps=steps)
    q = s.batch_size / len(examples)
    train(model, tokenizer, examples, dataclasses.replace(s, local_steps=1), [], 0, q)  # first-call overheads
    before = peak_mb()
    times = [t / steps for t in timed(lambda: train(model, tokenizer, examples, s, [], 0, q), repeats)]
    cache_mb = model.get_base_model().prefix_cache.bytes / 2**20 if cache else 0.0
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"seconds": times, "peak-mb": peak_mb(), "peak-mb-over-load": peak_mb() - before, "cache-mb": cache_mb,
            "cuda-peak-mb": cuda_mb,
            "warm-up-seconds": warm_up, "distinct-texts": len({ex.text for ex in examples})}


def ghost_step(model, s, num_items: int, tokenizer):
    """One DP-SGD step function with Opacus' ghost clipping (example level, where it applies):
    per-sample gradient norms from activations and backprops, two backward passes, no per-sample
    gradients stored."""
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from client.train import _collate, adam

    model.train()
    optimizer = adam(model, s)
    module = GradSampleModuleFastGradientClipping(model, max_grad_norm=s.max_grad_norm, use_ghost_clipping=True,
                                                  loss_reduction="mean")
    optimizer = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=s.noise_multiplier,
                                                max_grad_norm=s.max_grad_norm, expected_batch_size=s.batch_size,
                                                loss_reduction="mean")
    criterion = DPLossFastGradientClipping(module, optimizer, torch.nn.CrossEntropyLoss(), loss_reduction="mean")
    collate = _collate(model, tokenizer, s.max_length, num_items)

    def step(batch):
        inputs, targets, seen = collate(batch)
        criterion(module(**inputs).masked_fill(seen, float("-inf")), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # at the end, not the start: a step's memory is its own
    return step


def dp_step(model, s, num_items: int, tokenizer, plain_opacus: bool = False):
    """One DP-SGD step function as ``client.train.dp_steps`` runs it (``per_sample_gradients``, each
    example its own unit), on a given batch instead of a Poisson sample. ``plain_opacus``: as Opacus
    comes, its GradSampleModule's hooks on every trained module, its own nn.Linear grad sampler,
    and autograd also summing the LoRA weights' gradients that DPOptimizer discards."""
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from client.train import _collate, adam, per_sample_gradients, unit_gradients

    model.train()
    optimizer = DPOptimizer(adam(model, s), noise_multiplier=s.noise_multiplier, max_grad_norm=s.max_grad_norm,
                            expected_batch_size=s.batch_size, loss_reduction="mean")
    collate = _collate(model, tokenizer, s.max_length, num_items)
    # Wrapped for the step function's life, as dp_steps keeps the wrapping for a round's steps;
    # the model is the bench's own copy.
    wrapping = contextlib.ExitStack()
    module = GradSampleModule(model, loss_reduction="sum") if plain_opacus else \
        wrapping.enter_context(per_sample_gradients(model))

    def step(batch):
        unit_gradients(module, collate(batch), torch.arange(len(batch)), len(batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.wrapping = wrapping  # held: a dropped ExitStack would close the wrapping (and unwrap the model)
    return step


def plain_step(model, s, num_items: int, tokenizer):
    """One non-private Adam step function as ``client.train.plain_steps`` runs it."""
    from client.train import _collate, adam, position_losses

    model.train()
    optimizer = adam(model, s)
    collate = _collate(model, tokenizer, s.max_length, num_items)

    def step(batch):
        inputs, targets, seen = collate(batch)
        position, predicted = position_losses(model(**inputs), targets, seen)
        (position.sum() / predicted.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def lora_b_only(step):
    """The step with LoRA's A frozen at its shared initialisation (``lora-train-a = false``, FFA-LoRA)."""
    return lambda model, s, *rest: step(model, dataclasses.replace(s, lora_train_a=False), *rest)


STEPS = {"non-DP": plain_step, "DP": dp_step, "DP, plain Opacus": partial(dp_step, plain_opacus=True),
         "DP, ghost clipping": ghost_step, "non-DP, LoRA B only": lora_b_only(plain_step),
         "DP, LoRA B only": lora_b_only(dp_step)}
# The same steps as before two changes, side by side with the defaults: the adapted layers'
# frozen products in float32 (frozen-precision), and on top of that the adapted layers run on
# the padded batch (common.prefix_cache.run_layers), as before they skipped padding. Each:
# (the step it varies, whether padding is skipped, the frozen products' dtype).
VARIANTS = {"non-DP, float32 products": ("non-DP", True, "float32"),
            "DP, float32 products": ("DP", True, "float32"),
            "non-DP, padded layers": ("non-DP", False, "float32"),
            "DP, padded layers": ("DP", False, "float32")}


def warm_site():
    """A site's model with the catalog refreshed and every training text's frozen prefix cached:
    the steady state from a site's second round on."""
    from common.model import refresh_item_embeddings, text_inputs

    s, catalog, examples, _, model, tokenizer = setup(1024)
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    text_inputs(model, tokenizer, sorted({ex.text for ex in examples}), s.max_length)
    return s, catalog, examples, model, tokenizer


def ghost_step_case(steps: int, repeats: int) -> dict:
    """DP-SGD steps with ghost clipping on Poisson samples, cache on and warm."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    s, catalog, examples, model, tokenizer = warm_site()
    step = ghost_step(model, s, len(catalog), tokenizer)

    def run(n):
        for sampled in UniformWithReplacementSampler(num_samples=len(examples), sample_rate=s.batch_size / len(examples),
                                                     steps=n):
            step([examples[i] for i in sampled])

    run(1)
    before = peak_mb()
    times = [t / steps for t in timed(lambda: run(steps), repeats)]
    return {"seconds": times, "peak-mb": peak_mb(), "peak-mb-over-load": peak_mb() - before}


def resident_mb() -> tuple[float, float]:
    """This process's resident memory now, and its peak since the last ``reset_peak``, in MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    """Return freed heap to the OS, then restart the kernel's peak-RSS count (Linux' clear_refs),
    so the next peak is what a step itself allocates above what is live."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def tensor_peak_mb(step, batch) -> float:
    """The most memory a step's tensors hold at once above those that existed before it, as
    torch's memory profiler counts their allocations and frees: what the step needs, without the
    C heap's slack (freed blocks it keeps and cannot reuse for other sizes) that the
    resident-memory figure also counts."""
    import tempfile
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    if torch.cuda.is_available():  # the step's tensors live on the GPU: its allocator counts them
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(batch)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA's snapshots; torch 2.13's way on CPU
        timeline = Path(tmp) / "memory.json"
        prof.export_memory_timeline(str(timeline), device="cpu")
        _, sizes = json.loads(timeline.read_text())  # bytes live by category, at each allocation or free
    # The first entry holds the tensors that existed before the step (weights, optimizer state).
    return (max(map(sum, sizes)) - sum(sizes[0])) / 2**20


def same_batch_case(steps: int, kinds: list[str] | None = None) -> dict:
    """Every kind of step in STEPS on the same ``steps`` fixed batches of ``batch-size`` examples
    (seed 0), cache on and warm, in one process. Each kind has its own copy of the warm model,
    and the kinds take turns batch by batch, in an order that rotates, so the machine's drifting
    speed (here it halved from one day to the next) falls on every kind alike. Per step: its
    seconds, and its peak resident memory above the resident memory at its start, which is the
    step's own allocations (activations, gradients, per-sample gradients) and not the
    process's load, encoding or the other kinds' models; then, on three of the batches, the
    peak of its live tensors (``tensor_peak_mb``)."""
    import copy

    import torch

    s, catalog, examples, model, tokenizer = warm_site()
    order = torch.Generator().manual_seed(0)
    batches = [[examples[i] for i in torch.randperm(len(examples), generator=order)[:s.batch_size].tolist()]
               for _ in range(steps + 1)]
    kinds = kinds or list(STEPS) + list(VARIANTS)
    step = {}
    for kind in kinds:
        copied = copy.deepcopy(model)
        base_kind = kind
        if kind in VARIANTS:
            base_kind, unpadded, precision = VARIANTS[kind]
            vary(copied, unpadded, precision)
        step[kind] = STEPS[base_kind](copied, s, len(catalog), tokenizer)
    for kind in kinds:
        step[kind](batches[0])  # first-call overheads, and the optimizer's state
    results = {kind: {"seconds": [], "step-mb": [], "batch-size": s.batch_size} for kind in kinds}
    for n, batch in enumerate(batches[1:]):
        for kind in kinds[n % len(kinds):] + kinds[:n % len(kinds)]:
            reset_peak()
            start, _ = resident_mb()
            results[kind]["seconds"] += timed(lambda: step[kind](batch), 1)
            results[kind]["step-mb"].append(resident_mb()[1] - start)
    for kind in kinds:  # untimed: the profiler slows a step
        results[kind]["tensor-peak-mb"] = [tensor_peak_mb(step[kind], batch) for batch in batches[1:4]]
    return results


def vary(model, unpadded: bool, precision: str | None) -> None:
    """The model as before a change: padded adapted layers, or another frozen-products dtype."""
    import torch

    model.get_base_model().unpadded = unpadded
    if precision:
        model.get_base_model().frozen_dtype = getattr(torch, precision)


def catalog_case(cache: bool, repeats: int, unpadded: bool = True, precision: str | None = None) -> dict:
    from common.model import refresh_item_embeddings

    _, catalog, _, _, model, tokenizer = setup(1024 if cache else 0)
    vary(model, unpadded, precision)
    first = timed(lambda: refresh_item_embeddings(model, tokenizer, catalog.texts()), 1)
    return {"seconds": first + timed(lambda: refresh_item_embeddings(model, tokenizer, catalog.texts()), repeats),
            "items": len(catalog)}


def evaluation_case(cache: bool, repeats: int, unpadded: bool = True, precision: str | None = None) -> dict:
    from client.train import evaluate
    from common.model import refresh_item_embeddings

    s, catalog, _, test, model, tokenizer = setup(1024 if cache else 0, users=0)
    vary(model, unpadded, precision)
    refresh_item_embeddings(model, tokenizer, catalog.texts())
    first = timed(lambda: evaluate(model, tokenizer, test, s.max_length), 1)
    return {"seconds": first + timed(lambda: evaluate(model, tokenizer, test, s.max_length), repeats),
            "users": len(test), "items": len(catalog)}


def wire_case() -> dict:
    from flwr.app import ArrayRecord

    from common.model import adapter_state

    _, _, _, _, model, _ = setup(0)
    adapter = adapter_state(model)
    sent = ArrayRecord(adapter)  # what a train reply carries
    full = sum(p.numel() for p in model.get_base_model().parameters()) * 4
    return {"adapter-bytes": sum(len(a.data) for a in sent.values()), "adapter-numbers": sum(t.numel() for t in adapter.values()),
            "full-model-fp32-bytes": full}


def round_case() -> dict:
    """One silo's share of the first two default rounds, phase by phase, as its ClientApp runs
    them (client/client_app.py): round 1 in a fresh process, round 2 with what it kept."""
    import torch

    from client.client_app import load_data
    from client.train import evaluation_sums, train
    from common.config import Settings, defaults
    from common.model import adapter_config, build_model, load_encoder, refresh_item_embeddings
    from common.privacy import epsilon, read_budget
    from simulations.partition import materialize

    torch.set_num_threads(1)
    s = Settings.from_run_config(defaults())
    root = materialize(s, 10)
    phases: dict[str, list[float]] = {}

    def phase(name, fn):
        started = time.perf_counter()
        out = fn()
        phases.setdefault(name, []).append(time.perf_counter() - started)
        return out

    catalog, train_ex, valid, test = phase("data load (once per process)",
                                           lambda: load_data(root / "client-0", root / "catalog.csv", s.history_len))

    def load_model():
        encoder, tokenizer = load_encoder(s.model, s.model_layers)
        return build_model(encoder, len(catalog), adapter_config(s, encoder)), tokenizer

    model, tokenizer = phase("model load (once per process)", load_model)
    q = s.batch_size / read_budget(root / "client-0", {}).declared_examples
    history = []
    for _ in range(2):
        phase("catalog refresh", lambda: refresh_item_embeddings(model, tokenizer, catalog.texts()))
        history = phase("training", lambda: train(model, tokenizer, train_ex, s, history, 0, q)).history
        phase("accounting (PRV)", lambda: epsilon(history + [(s.eval_noise_multiplier, 1.0, 1)], s.delta, s.accountant))
        phase("evaluation", lambda: [evaluation_sums(model, tokenizer, ex, s.max_length) for ex in (test, valid)])
    return {"phases": phases, "site-examples": len(train_ex), "site-users": len(test)}


def server_share(flower_log: Path) -> dict:
    """Per round, from Flower's log timestamps: the whole round, and the server's own part (after
    the train replies are in until evaluation is sent, and after the evaluation replies are in
    until the next round starts: aggregation, validation, ledger, checkpoint)."""
    import datetime

    stamped = [(datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"), line[24:])
               for line in flower_log.read_text().splitlines() if line[:2] == "20"]
    starts = [t for t, text in stamped if "[ROUND" in text]
    server, busy_from = 0.0, None
    for t, text in stamped:
        if "aggregate_train: Received" in text or text.strip().startswith("└──> Aggregated MetricRecord: {'val-hr@10'"):
            busy_from = t
        elif busy_from and ("configure_evaluate" in text or "[ROUND" in text or "Triggered stop" in text):
            server += (t - busy_from).total_seconds()
            busy_from = None
    rounds = (stamped[-1][0] - starts[0]).total_seconds() if starts else 0.0
    return {"round-seconds": rounds / max(len(starts), 1), "server-seconds-per-round": server / max(len(starts), 1)}


def in_fresh_process(fn, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


# The default run beside the same run as before a change: label -> its --set overrides.
SIMULATIONS = {"on": [], "on, float32 products": ["frozen-precision=float32"], "off": ["prefix-cache-mb=0"]}


def simulate_case(overrides: list[str], out: Path) -> dict:
    """One default ``fedrec simulate`` (with ``overrides``), wall time and final metrics, in a fresh FEDREC_HOME."""
    run_dir = out / f"simulate-{'-'.join(o.split('=')[1] for o in overrides) or 'default'}-{int(time.time())}"
    env = {**os.environ, "FEDREC_HOME": str(out / f"home-{run_dir.name}")}
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "fedrec"), "simulate", "--run-dir", str(run_dir),
                    *(["--set", *overrides] if overrides else [])], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    updates = sum(r.get("clients", 0) for r in rounds)
    unit = json.loads((run_dir / "config.json").read_text())["privacy-unit"].split(" (")[0]
    return {"wall-seconds": wall, "val-ndcg@10": summary["val-ndcg@10"], "val-hr@10": summary["val-hr@10"],
            "val-recall@20": summary["val-recall@20"], "epsilon-max": summary["client-epsilon-max"],
            "delta": summary["delta"], "accountant": summary["accountant"], "privacy-unit": unit,
            "client-updates-per-minute": updates / (wall / 60), "run-dir": str(run_dir),
            **server_share(run_dir / "flower.log")}


def median_range(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values]
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def paired_ratio(values: list[float], baseline: list[float]) -> float:
    return statistics.median(v / b for v, b in zip(values, baseline))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def same_batch_lines(same: dict) -> list[str]:
    lines = []
    for kind, r in same.items():
        tensors = f"; its tensors' peak {median_range(r['tensor-peak-mb'], digits=1)} MB" if "tensor-peak-mb" in r else ""
        lines.append(f"| same {r['batch-size']}-example batches, kinds taking turns, cache on (warm): {kind} step | "
                     f"{median_range(r['seconds'])} s | +{median_range(r['step-mb'], digits=0)} MB above the step's "
                     f"start{tensors} |")

    def ratio_line(label: str, kind: str, baseline: str) -> str:
        time_ratio = paired_ratio(same[kind]["seconds"], same[baseline]["seconds"])
        memory_ratio = paired_ratio(same[kind]["step-mb"], same[baseline]["step-mb"])
        tensors = ""
        if "tensor-peak-mb" in same[kind] and "tensor-peak-mb" in same[baseline]:
            tensors = f"; tensors' peak {paired_ratio(same[kind]['tensor-peak-mb'], same[baseline]['tensor-peak-mb']):.2f}×"
        return (f"| {label}, same batches (median of per-batch ratios) | {time_ratio:.2f}× | "
                f"resident {memory_ratio:.2f}×{tensors} |")

    for kind in [k for k in same if k.startswith("DP") and k not in VARIANTS and "LoRA B only" not in k]:
        lines.append(ratio_line(f"{kind} / non-DP step", kind, "non-DP"))
    if "DP, plain Opacus" in same:
        lines.append(ratio_line("DP step: fedrec's / plain Opacus'", "DP", "DP, plain Opacus"))
    if "DP, LoRA B only" in same:
        lines.append(ratio_line("DP / non-DP step, LoRA B only (lora-train-a = false)", "DP, LoRA B only",
                                "non-DP, LoRA B only"))
    for variant in [k for k in same if k in VARIANTS]:
        kind, unpadded, _ = VARIANTS[variant]
        if unpadded:  # the defaults against float32 products
            lines.append(ratio_line(f"{kind} step: default / float32 frozen products", kind, variant))
        elif f"{kind}, float32 products" in same:  # float32 products: padding skipped against padded layers
            lines.append(ratio_line(f"{kind} step, float32 products: padding skipped / padded layers",
                                    f"{kind}, float32 products", variant))
    return lines


PAIR = ["non-DP", "DP"]


def pair_lines(pair: dict) -> list[str]:
    """DP against non-DP alone, taking turns: the per-batch ratios' median, quartiles and range, and
    the ratio of total times with its 95 % bootstrap interval."""
    if not pair:
        return []
    plain, dp = (pair[kind] for kind in PAIR)

    def spread(values: list[float]) -> str:
        q1, _, q3 = statistics.quantiles(values, n=4)
        return f"{statistics.median(values):.3f} (quartiles {q1:.3f}–{q3:.3f}; {min(values):.3f}–{max(values):.3f})"

    ratios = {key: [d / p for d, p in zip(dp[key], plain[key])] for key in ("seconds", "step-mb", "tensor-peak-mb")}
    low, high = bootstrap_total_ratio(dp["seconds"], plain["seconds"])
    total = sum(dp["seconds"]) / sum(plain["seconds"])
    return [f"| DP / non-DP step, the two alone taking turns on the same {len(ratios['seconds'])} "
            f"batches of {dp['batch-size']} (per-batch ratios) | {spread(ratios['seconds'])}× | "
            f"resident {spread(ratios['step-mb'])}×; tensors' peak {statistics.median(ratios['tensor-peak-mb']):.2f}× |",
            f"| DP / non-DP step, the same {len(ratios['seconds'])} batches: total time | {total:.3f}× "
            f"(95 % bootstrap interval {low:.3f}–{high:.3f}) | |"]


def bootstrap_total_ratio(values: list[float], baseline: list[float], draws: int = 2000) -> tuple[float, float]:
    """The 95 % percentile interval of Σ values / Σ baseline over batches resampled with
    replacement, pairs kept together (``simulations.significance.paired_bootstrap``, seed 0)."""
    import torch

    from simulations.significance import paired_bootstrap

    times = paired_bootstrap({"s": torch.tensor(values, dtype=torch.float64)},
                             {"s": torch.tensor(baseline, dtype=torch.float64)}, draws)["s"]
    return 1 + times["lift-low"], 1 + times["lift-high"]


def report(results: dict, command: str) -> str:
    steps = results["steps"]
    lines = [f"Measured by `{command}` on {results['machine']}, {results['date']}. "
             "Medians over repeats (min–max); one torch thread per case, as one Ray worker runs one client.", "",
             "| case | time | memory |", "| --- | ---: | ---: |"]
    for name, r in steps.items():
        cuda = f"; CUDA peak {r['cuda-peak-mb']:.0f} MB" if r.get("cuda-peak-mb") else ""
        lines.append(f"| {name} | {median_range(r['seconds'])} s per step | peak RSS {r['peak-mb']:.0f} MB; "
                     f"+{r['peak-mb-over-load']:.0f} MB during the timed steps{cuda} |")
    for key in ("dp", "plain"):
        off, on = steps[f"{key} step, cache off"], steps[f"{key} step, cache on (warm)"]
        lines.append(f"| {key} step: cache off / on | {statistics.median(off['seconds']) / statistics.median(on['seconds']):.2f}× | |")
    for cache in ("off", "on (warm)"):
        dp, plain = steps[f"dp step, cache {cache}"], steps[f"plain step, cache {cache}"]
        lines.append(f"| DP / non-DP step, cache {cache} | {statistics.median(dp['seconds']) / statistics.median(plain['seconds']):.2f}× | |")
    if "dp step, ghost clipping, cache on (warm)" in steps:
        ghost, ours = steps["dp step, ghost clipping, cache on (warm)"], steps["dp step, cache on (warm)"]
        lines.append(f"| DP step: ghost clipping / fedrec's, cache on | {statistics.median(ghost['seconds']) / statistics.median(ours['seconds']):.2f}× | |")
    lines += same_batch_lines(results.get("same-batches", {}))
    lines += pair_lines(results.get("dp-pair", {}))
    warm = steps["dp step, cache on (warm)"]
    held = f"{warm['cache-mb']:.0f} MB held (catalog and training texts)" if "cache-mb" in warm else ""
    lines.append(f"| cache warm-up: {warm['distinct-texts']} distinct training texts of the site, once | {warm['warm-up-seconds']:.1f} s | {held} |")
    for cache, r in results["catalog"].items():
        lines.append(f"| catalog refresh ({r['items']} items), cache {cache} | first {r['seconds'][0]:.1f} s, then {median_range(r['seconds'][1:], digits=1)} s | |")
    for cache, r in results["evaluation"].items():
        lines.append(f"| full-ranking evaluation ({r['users']} users × {r['items']} items), cache {cache} | first {r['seconds'][0]:.1f} s, then {median_range(r['seconds'][1:], digits=1)} s | |")
    wire = results["wire"]
    lines.append(f"| bytes a client sends per round: the adapter ({wire['adapter-numbers']:,} numbers) | {wire['adapter-bytes']:,} B "
                 f"({wire['adapter-bytes'] / wire['full-model-fp32-bytes']:.2%} of the full fp32 model's {wire['full-model-fp32-bytes']:,} B) | |")
    if "round" in results:
        site = results["round"]
        for name, times in site["phases"].items():
            shown = ", ".join(f"round {k}: {t:.2f} s" for k, t in enumerate(times, start=1)) if len(times) > 1 else f"{times[0]:.2f} s"
            lines.append(f"| one silo ({site['site-examples']} examples, {site['site-users']} users): {name} | {shown} | |")
    lines += simulate_lines(results.get("simulate", {}), results.get("simulate-measured", ""))
    return "\n".join(lines) + "\n"


def simulations(labels: list[str], out: Path) -> dict:
    runs = {}
    for label in labels:
        console.print(f"default fedrec simulate, cache {label}")
        runs[label] = simulate_case(SIMULATIONS[label], out)
    return runs


def simulate_lines(runs: dict, measured: str = "") -> list[str]:
    """``measured``: where the runs came from when not from this report's own command."""
    lines = [f"| default `fedrec simulate` runs below: {measured} | | |"] if measured and runs else []
    for cache, r in runs.items():
        lines.append(f"| default `fedrec simulate`, cache {cache} | {r['wall-seconds']:.0f} s wall, "
                     f"{r['client-updates-per-minute']:.1f} client updates/min; validation NDCG@10 {r['val-ndcg@10']:.4f}, "
                     f"clients' ε max {r['epsilon-max']:.3f} ({r['privacy-unit']}, δ = {r['delta']:g}, {r['accountant'].upper()}) | |")
        if "server-seconds-per-round" in r:
            lines.append(f"| … its server side per round (aggregation, validation, ledger, checkpoint) | "
                         f"{r['server-seconds-per-round']:.2f} s of a {r['round-seconds']:.0f} s round "
                         f"({r['server-seconds-per-round'] / r['round-seconds']:.2%}) | |")
    return lines


def add_earlier_simulations(results: dict, out: Path) -> None:
    """The default runs of an earlier ``--simulate-only`` (OUT/simulate.json), with their own
    command, date and machine, so a report without ``--simulate`` still shows them."""
    path = out / "simulate.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        results["simulate"] = earlier["simulate"]
        results["simulate-measured"] = (f"`python -m simulations.bench --simulate-only` ({path}), "
                                        f"{earlier['date']}, {earlier['machine']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--steps", type=int, default=8, help="steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pair-batches", type=int, default=256, help="batches DP and non-DP take turns on alone")
    parser.add_argument("--simulate", action="store_true", help="also three default simulations: as they are, float32 products, cache off")
    parser.add_argument("--simulate-only", action="store_true",
                        help="only the default simulation and the same with float32 frozen products, back to back: "
                             "print, and write OUT/simulate.json (BENCHMARKS.md is left as it is)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from OUT/bench.json")
    parser.add_argument("--same-batches-only", action="store_true",
                        help="only the kinds of step taking turns on the same batches: print, and write "
                             "OUT/same-batches.json (BENCHMARKS.md is left as it is)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.simulate_only:
        results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                   "simulate": simulations(["on", "on, float32 products"], args.out)}
        (args.out / "simulate.json").write_text(json.dumps(results, indent=2))
        console.print(f"{results['machine']}, {results['date']}", *simulate_lines(results["simulate"]), sep="\n")
        return results
    if args.same_batches_only:
        results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                   "same-batches": in_fresh_process(same_batch_case, 2 * args.steps),
                   "dp-pair": in_fresh_process(same_batch_case, args.pair_batches, PAIR)}
        (args.out / "same-batches.json").write_text(json.dumps(results, indent=2))
        console.print(f"{results['machine']}, {results['date']}", *same_batch_lines(results["same-batches"]),
                      *pair_lines(results["dp-pair"]), sep="\n")
        return results
    if args.report_only:
        results = json.loads((args.out / "bench.json").read_text())
        command = "python -m simulations.bench" + (" --simulate" if "simulate" in results and "simulate-measured" not in results else "")
        args.markdown.write_text("# Benchmarks\n\n" + report(results, command))
        return results
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "steps": {}, "catalog": {}, "evaluation": {}}
    for key, dp in (("dp", True), ("plain", False)):
        for cache, label in ((False, "off"), (True, "on (warm)")):
            console.print(f"{key} step, cache {label}")
            results["steps"][f"{key} step, cache {label}"] = in_fresh_process(step_case, dp, cache, args.steps, args.repeats)
    console.print("dp step with ghost clipping, cache on (warm)")
    results["steps"]["dp step, ghost clipping, cache on (warm)"] = in_fresh_process(ghost_step_case, args.steps, args.repeats)
    for cache, label in ((False, "off"), (True, "on")):
        console.print(f"catalog refresh and evaluation, cache {label}")
        results["catalog"][label] = in_fresh_process(catalog_case, cache, args.repeats)
        results["evaluation"][label] = in_fresh_process(evaluation_case, cache, max(1, args.repeats // 2))
    for label, unpadded in (("on, float32 products", True), ("on, padded layers", False)):
        console.print(f"catalog refresh and evaluation, cache {label}")
        results["catalog"][label] = in_fresh_process(catalog_case, True, args.repeats, unpadded, "float32")
        results["evaluation"][label] = in_fresh_process(evaluation_case, True, max(1, args.repeats // 2), unpadded,
                                                       "float32")
    console.print(f"{', '.join([*STEPS, *VARIANTS])} steps taking turns on the same batches, cache on (warm)")
    results["same-batches"] = in_fresh_process(same_batch_case, 2 * args.steps)
    console.print(f"{' and '.join(PAIR)} steps alone, taking turns on {args.pair_batches} batches, cache on (warm)")
    results["dp-pair"] = in_fresh_process(same_batch_case, args.pair_batches, PAIR)
    results["wire"] = in_fresh_process(wire_case)
    console.print("one silo's first two rounds, phase by phase")
    results["round"] = in_fresh_process(round_case)
    if args.simulate:
        results["simulate"] = simulations(list(SIMULATIONS), args.out)
    else:
        add_earlier_simulations(results, args.out)
    command = "python -m simulations.bench" + (" --simulate" if args.simulate else "")
    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    markdown = report(results, command)
    args.markdown.write_text("# Benchmarks\n\n" + markdown)
    table = Table("case", "figure")
    for line in markdown.splitlines()[4:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table.add_row(cells[0], " ".join(cells[1:]))
    console.print(table)
    return results


if __name__ == "__main__":
    main()
