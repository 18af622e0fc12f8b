"""Local training of the adapter with Opacus DP-SGD, and local evaluation.

One call of ``train`` runs ``local_steps`` DP-SGD steps: Poisson sampling with a public rate
q (``batch-size / declared-examples``, never the private example count; Opacus'
``UniformWithReplacementSampler``), per-example clipping to ``max_grad_norm`` and Gaussian noise
σ · max_grad_norm on the sum (Opacus' ``GradSampleModule`` and ``DPOptimizer``), then Adam on the
noisy sum divided by the public expected batch size ``batch-size``. Neither q nor the divisor
depends on the private n, as add/remove accounting requires. The round is appended to the
client's stored history as (σ, q, steps), so the ε it returns is cumulative and exactly what
``fedrec audit`` recomputes.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from common.data import DataError, Example
from common.metrics import METRICS, metrics_from_ranks, per_user_metrics, target_ranks
from common.model import device, is_trained, score_users
from common.privacy import History, epsilon


@dataclass
class TrainResult:
    loss: float
    steps: int
    sample_rate: float
    history: History  # the accountant's full history after this round
    epsilon: float


def _collate(tokenizer, max_length, num_items):
    def collate(batch: list[tuple[str, int, tuple[int, ...]]]):
        texts = [text for text, _, _ in batch] or [""]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        targets = torch.tensor([target for _, target, _ in batch], dtype=torch.long)
        # The user's own history is excluded when ranking, so it is excluded from the softmax
        # too: the model learns to rank the target among the items it will compete with.
        seen = torch.zeros(len(batch), num_items, dtype=torch.bool)
        for row, (_, target, items) in enumerate(batch):
            seen[row, list(items)] = True
            seen[row, target] = False  # a repeat interaction stays a valid target
        return enc["input_ids"][: len(batch)], enc["attention_mask"][: len(batch)], targets, seen
    return collate


def train(model, tokenizer, examples: list[Example], s, history: History, seed: int, q: float) -> TrainResult:
    """``local_steps`` steps of DP-SGD with Adam at public Poisson rate ``q`` (plain Adam on
    shuffled batches of ``batch-size`` when ``s.dp`` is false) on ``examples``."""
    if not examples:  # a data problem of the site's, reported as one (category "data"), nothing released
        raise DataError("no training examples: every user of this site has a single event")
    model.train()
    # What trains (common.model.is_trained), and why:
    # - The per-item bias gets its own step size. Under DP noise Adam moves every coordinate by
    #   about its learning rate per step whatever the signal, and a bias over 1,682 items has
    #   little signal per item: with the DP popularity prior in place it is better left frozen
    #   (bias-learning-rate = 0), which also leaves the whole clipping budget to the LoRA weights.
    # - The score scale is one number with a strong, consistent gradient: Adam moves it by its
    #   full step size every step, and K clients moving it the same way (times the server's
    #   learning rate) overshoot by far (measured: s went 8 → 19 → 12 → 35 in three rounds).
    # - LoRA's A stays at its shared random initialisation unless lora-train-a (FFA-LoRA, Sun et
    #   al., ICLR 2024): ΔW = B·A is then linear in what is trained, so FedAvg of the clients' B
    #   is exactly the average of their ΔW (averaging A and B separately is not), and DP noise
    #   lands on half as many numbers.
    for n, p in model.named_parameters():
        if "lora_" in n or "modules_to_save" in n:
            p.requires_grad_(is_trained(n, s))
    bias = [p for n, p in model.named_parameters() if n.endswith("scorer.modules_to_save.default.bias")]
    scale = [p for n, p in model.named_parameters() if n.endswith("scorer.modules_to_save.default.log_scale")]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not b for b in bias + scale)]
    groups = [{"params": rest, "lr": s.learning_rate}]
    if s.bias_learning_rate > 0:
        groups.append({"params": bias, "lr": s.bias_learning_rate})
    if s.scale_learning_rate > 0:
        groups.append({"params": scale, "lr": s.scale_learning_rate})
    optimizer = torch.optim.Adam(groups)
    # (text, target, seen) triples, batched by our collate (Opacus' sampler yields index lists).
    dataset = [(ex.text, ex.target, ex.seen) for ex in examples]
    # Under DP the batch sampling and the noise must be secret: a generator seeded from the
    # run config would let anyone who knows the seed replay (and subtract) the noise. Both
    # come from the OS entropy pool; only non-private training is reproducible from `seed`.
    generator = torch.Generator().manual_seed(secrets.randbits(63) if s.dp else seed)
    if not s.dp:
        torch.manual_seed(seed)  # the encoder's dropout too, so a non-private run replays exactly
    num_items = model.get_base_model().item_embeddings.shape[0]
    collate = _collate(tokenizer, s.max_length, num_items)
    module = model
    if s.dp:
        # A Poisson batch can be empty (a noise-only step): our collate returns 0-row tensors.
        sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=q, generator=generator,
                                                steps=s.local_steps)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
        module = GradSampleModule(model, loss_reduction="mean")
        # expected_batch_size = batch-size, public: the noisy sum is divided by it, not by q·n.
        optimizer = DPOptimizer(optimizer, noise_multiplier=s.noise_multiplier, max_grad_norm=s.max_grad_norm,
                                expected_batch_size=s.batch_size, loss_reduction="mean", generator=generator)
    else:
        loader = DataLoader(dataset, batch_size=min(s.batch_size, len(examples)), shuffle=True, generator=generator,
                            collate_fn=collate)
    losses, steps = [], 0
    try:
        while steps < s.local_steps:
            for input_ids, attention_mask, targets, seen in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(targets):
                    logits = module(input_ids=input_ids.to(device()), attention_mask=attention_mask.to(device()))
                    logits = logits.masked_fill(seen.to(device()), float("-inf"))
                    # Mean loss matches Opacus' default loss_reduction='mean': it rescales the
                    # per-sample gradients and divides the noisy sum by the *expected* batch size.
                    loss = torch.nn.functional.cross_entropy(logits, targets.to(device()), reduction="mean")
                    with warnings.catch_warnings():  # the frozen embeddings take no gradient, by design
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    losses.append(loss.item())
                else:
                    # An empty Poisson batch still releases a step: the noise alone. The encoder
                    # cannot run on zero rows, so Opacus gets zero-row per-sample gradients.
                    for p in module.parameters():
                        if p.requires_grad:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                optimizer.step()
                steps += 1
                if steps >= s.local_steps:
                    break
    finally:
        if s.dp:
            module.to_standard_module()
    model.zero_grad(set_to_none=True)
    if s.dp:
        # Each loop step was one noisy DPOptimizer step at rate q: exactly what is accounted.
        history = list(history) + [(s.noise_multiplier, q, steps)]
        eps = epsilon(history, s.delta, s.accountant)
    else:
        eps = math.inf
    return TrainResult(sum(losses) / max(len(losses), 1), steps, q if s.dp else 0.0, history, eps)


def evaluate(model, tokenizer, examples: list[Example], max_length: int) -> dict[str, float]:
    """Full-ranking HR@10, NDCG@10, Recall@20 over the whole catalog (item embeddings fresh)."""
    return metrics_from_ranks(ranks(model, tokenizer, examples, max_length))


def evaluation_sums(model, tokenizer, examples: list[Example], max_length: int) -> dict[str, float]:
    """Σ over users of HR@10, NDCG@10 and Recall@20 (each in [0, 1]), and the user count."""
    per_user = per_user_metrics(ranks(model, tokenizer, examples, max_length)) if examples else {}
    sums = {f"sum-{k}": float(per_user[k].sum()) if examples else 0.0 for k in METRICS}
    return {**sums, "count": float(len(examples))}


def ranks(model, tokenizer, examples: list[Example], max_length: int) -> torch.Tensor:
    scores = score_users(model, tokenizer, [ex.text for ex in examples], max_length)
    targets = torch.tensor([ex.target for ex in examples])
    return target_ranks(scores, targets, [ex.seen for ex in examples])
