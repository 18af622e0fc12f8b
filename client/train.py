"""Local training of the adapter with Opacus DP-SGD, and local evaluation.

One call of ``train`` runs ``local_steps`` DP-SGD steps over the site's privacy units
(``privacy-unit``: examples, or users with all their examples):

* Poisson sampling of units with a public rate q (``batch-size / declared-examples`` or
  ``batch-size / declared-users``, never a private count; Opacus'
  ``UniformWithReplacementSampler``);
* a sampled user brings at most ``examples-per-user`` of its examples, drawn at random; its
  gradient is the mean of their per-example gradients (``per_sample_gradients``: the trained
  linear maps compute theirs in their own backward, Opacus' ``GradSampleModule`` hooks the rest),
  so g_u = (1/k_u) Σ_{i ∈ u} ∇ℓ_i, and an example unit is a user of one example;
* each unit's gradient is clipped to C = ``max-grad-norm`` and N(0, σ²C²) goes on the sum
  (Opacus' ``DPOptimizer``), then Adam on the noisy sum divided by the public expected batch
  size ``batch-size``.

With ``sequence-training`` a sample is not an example but a window of a user's sequence
(``user_windows``: up to ``sequence-length`` + 1 consecutive items, every one after the first
predicted from those before it in one causal pass), and a sampled user brings all of its
windows: g_u is the mean of the gradients of the user's predicted positions, the sequence
counterpart of the example mean above, so per-user clipping is per-sample clipping.

Neither q nor the divisor depends on the site's private size, as add/remove accounting
requires. The round is appended to the client's stored history as (σ, q, steps), so the ε it
returns is cumulative and exactly what ``fedrec audit`` recomputes.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader

from client.secure_aggregation import QUANTIZATION_SLACK_MAX, SecureSum, quantization_slack
from common.config import ConfigError
from common.data import DataError, Example, privacy_units
from common.metrics import METRICS, metrics_from_ranks, per_user_metrics, target_ranks
from common.model import device, history_inputs, is_trained, score_users, text_inputs
from common.privacy import History, epsilon
from common.sequence import PAD


@dataclass
class TrainResult:
    loss: float
    steps: int
    sample_rate: float
    history: History  # the accountant's full history after this round
    epsilon: float
    quantization_slack: float = 0.0  # a distributed-noise share's τ (client/secure_aggregation.py)


def _collate(model, tokenizer, max_length, num_items):
    def collate(batch: list[Example]):
        inputs = text_inputs(model, tokenizer, [ex.text for ex in batch], max_length)
        inputs |= history_inputs(model, [ex.seen for ex in batch])
        targets = torch.tensor([ex.target for ex in batch], dtype=torch.long)
        # The user's own history is excluded when ranking, so it is excluded from the softmax
        # too: the model learns to rank the target among the items it will compete with.
        seen = torch.zeros(len(batch), num_items, dtype=torch.bool)
        for row, ex in enumerate(batch):
            seen[row, list(ex.seen)] = True
            seen[row, ex.target] = False  # a repeat interaction stays a valid target
        return inputs, targets.to(device()), seen.to(device())
    return collate


@dataclass(frozen=True)
class Window:
    """Consecutive items of one user's training sequence; each after the first is a target."""

    items: tuple[int, ...]
    before: tuple[int, ...]  # the user's items before the window: excluded from its softmax, as seen items are


def user_windows(examples: list[Example], length: int) -> tuple[list[Window], list[list[int]]]:
    """Each user's training sequence (their longest example's history and target) cut, from the
    most recent end, into windows of at most ``length`` + 1 items overlapping by one, so each
    item but the first is the target of exactly one position; and the windows' indices grouped
    by user, in order of first appearance (the privacy units of sequence training)."""
    longest: dict[str, Example] = {}
    for ex in examples:
        if ex.user not in longest or len(ex.seen) > len(longest[ex.user].seen):
            longest[ex.user] = ex
    windows, units = [], []
    for ex in longest.values():
        sequence, unit, end = (*ex.seen, ex.target), [], len(ex.seen) + 1
        while end > 1:
            start = max(0, end - length - 1)
            unit.append(len(windows))
            windows.append(Window(sequence[start:end], sequence[:start]))
            end = start + 1
        units.append(unit)
    return windows, units


def _collate_windows(model, num_items):
    length = model.get_base_model().sequence_length

    def collate(batch: list[Window]):
        history = torch.full((len(batch), length), PAD, dtype=torch.long)
        targets = torch.full((len(batch), length), PAD, dtype=torch.long)
        seen = torch.zeros(len(batch), length, num_items, dtype=torch.bool)
        for row, window in enumerate(batch):
            inputs, predicted = torch.tensor(window.items[:-1]), torch.tensor(window.items[1:])
            slots = slice(length - len(inputs), length)  # left-padded, as the tower reads histories
            history[row, slots], targets[row, slots] = inputs, predicted
            earlier = torch.zeros(num_items, dtype=torch.bool)
            earlier[list(window.before)] = True
            read = torch.nn.functional.one_hot(inputs, num_items).cumsum(0) > 0  # items up to each slot
            seen[row, slots] = (read | earlier).scatter(1, predicted[:, None], False)  # a repeat stays a target
        return {"history": history.to(device())}, targets.to(device()), seen.to(device())
    return collate


def train(model, tokenizer, examples: list[Example], s, history: History, seed: int, q: float,
          canaries: GradientCanaries | None = None, share: SecureSum | None = None) -> TrainResult:
    """``local_steps`` steps of DP-SGD with Adam at public Poisson rate ``q`` over ``s.privacy_unit``
    (plain Adam on shuffled batches of ``batch-size`` examples when ``s.dp`` is false). With
    ``canaries``, the site's white-box audit canaries ride in every DP-SGD step.

    With ``share`` (the running SecAgg+ protocol), this is a site's share of one distributed-noise
    step (``share_step``)."""
    if not examples:  # a data problem of the site's, reported as one (category "data"), nothing released
        raise DataError("no training examples: every user of this site has a single event")
    model.train()
    charged = s.noise_multiplier  # the σ the accountant is charged: the sum's, under distributed noise
    if share is None:
        optimizer, box, slack = adam(model, s), None, 0.0
    else:  # this site adds its share σ/√T; the T shares in SecAgg+'s sum carry σ
        optimizer, box, slack = share_step(model, s, share)
        s = dataclasses.replace(s, noise_multiplier=s.noise_multiplier / math.sqrt(share.threshold))
    # Under DP the batch sampling and the noise must be secret: a generator seeded from the
    # run config would let anyone who knows the seed replay (and subtract) the noise. Both
    # come from the OS entropy pool; only non-private training is reproducible from `seed`.
    generator = torch.Generator().manual_seed(secrets.randbits(63) if s.dp else seed)
    num_items = model.get_base_model().item_embeddings.shape[0]
    if s.sequence_training:
        samples, units = user_windows(examples, s.sequence_length)
        collate, cap = _collate_windows(model, num_items), None
    else:
        samples, units = examples, privacy_units(examples, s.privacy_unit)
        collate, cap = _collate(model, tokenizer, s.max_length, num_items), s.examples_per_user
    if s.dp:
        losses = dp_steps(model, optimizer, samples, units, cap, collate, s, q, generator, canaries, box)
        # Each step was one noisy DPOptimizer step at rate q: exactly what is accounted.
        history = list(history) + [(charged, q, s.local_steps)]
        eps = epsilon(history, s.delta, s.accountant)
    else:
        torch.manual_seed(seed)  # the encoder's dropout too, so a non-private run replays exactly
        losses, eps = plain_steps(model, optimizer, samples, collate, s, generator), math.inf
    model.zero_grad(set_to_none=True)
    return TrainResult(sum(losses) / max(len(losses), 1), s.local_steps, q if s.dp else 0.0, history, eps, slack)


def adam(model, s) -> torch.optim.Adam:
    """Adam over what trains (common.model.is_trained), and why:

    - The per-item bias gets its own step size. Under DP noise Adam moves every coordinate by
      about its learning rate per step whatever the signal, and a bias over 1,682 items has
      little signal per item: with the DP popularity prior in place it is better left frozen
      (bias-learning-rate = 0), which also leaves the whole clipping budget to the LoRA weights.
    - The score scale is one number with a strong, consistent gradient: Adam moves it by its
      full step size every step, and K clients moving it the same way (times the server's
      learning rate) overshoot by far (measured: s went 8 → 19 → 12 → 35 in three rounds).
    - LoRA's A stays at its shared random initialisation unless lora-train-a (FFA-LoRA, Sun et
      al., ICLR 2024): ΔW = B·A is then linear in what is trained, so FedAvg of the clients' B
      is exactly the average of their ΔW (averaging A and B separately is not), and DP noise
      lands on half as many numbers.
    """
    mark_trained(model, s)
    bias = [p for n, p in model.named_parameters() if n.endswith("scorer.modules_to_save.default.bias")]
    scale = [p for n, p in model.named_parameters() if n.endswith("scorer.modules_to_save.default.log_scale")]
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not b for b in bias + scale)]
    groups = [{"params": rest, "lr": s.learning_rate}]
    if s.bias_learning_rate > 0:
        groups.append({"params": bias, "lr": s.bias_learning_rate})
    if s.scale_learning_rate > 0:
        groups.append({"params": scale, "lr": s.scale_learning_rate})
    return torch.optim.Adam(groups)


def mark_trained(model, s) -> None:
    for n, p in model.named_parameters():
        if "lora_" in n or "modules_to_save" in n:
            p.requires_grad_(is_trained(n, s))


def share_step(model, s, share: SecureSum) -> tuple[torch.optim.SGD, float, float]:
    """A site's part of one distributed-noise step: SGD with step size 1, so the adapter it sends
    is θ − g_k, g_k = (Σ clipped unit gradients + N(0, (σ/√T)²C²)) / batch-size.

    SecAgg+ averages the K ≥ T sites' adapters with weight 1 each: θ − (Σ_k g_k)/K, whose noise
    is N(0, (K/T)·σ²C²) on the K sites' summed clipped gradients, at least σ's when K ≥ T. It is
    one DP-SGD step of the pooled sites (expected batch K·batch-size), and the server's optimizer
    (``server-optimizer``, e.g. Adam) steps with it, as a pooled DP-Adam would. Only what Adam
    would train moves: the same parameters, at one step size (the server's).

    SecAgg+ clips what it sums to ±r and rounds it to a grid, which the accounting of a Gaussian
    sum does not cover (``quantization_slack``). So the clipped sum is boxed to ±r/4 · batch-size
    per coordinate before the noise (a projection: the sensitivity stays C), which keeps the clean
    value θ − sum/batch-size within max|θ| + r/4, and the share is refused (category "request",
    nothing released) when its τ exceeds QUANTIZATION_SLACK_MAX. Returns the optimizer, the box
    on the sum and τ."""
    mark_trained(model, s)
    trained = [p for p in model.parameters() if p.requires_grad]
    box = share.clipping_range / 4
    largest = max(float(p.detach().abs().max()) for p in trained) + box
    noise_std = s.noise_multiplier / math.sqrt(share.threshold) * s.max_grad_norm / s.batch_size
    slack = quantization_slack(share, noise_std, largest, sum(p.numel() for p in trained))
    if not slack <= QUANTIZATION_SLACK_MAX:
        raise ConfigError(f"distributed-noise: SecAgg+'s quantization (±{share.clipping_range:g} in "
                          f"{share.levels} steps) would leave τ = {slack:.3g} > {QUANTIZATION_SLACK_MAX:g} between "
                          "the sum the server sees and the Gaussian sum accounted; a share's noise is too small "
                          "for the grid, or the global adapter too close to ±secagg-clipping-range")
    return torch.optim.SGD(trained, lr=1.0), box * s.batch_size, slack


class BoxedSumDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with the clipped sum clamped to [−box, box] per coordinate before the
    noise. The clamp is the projection onto a box, 1-Lipschitz in L2: two sums within C of each
    other stay within C, so the Gaussian mechanism's sensitivity and its accounting are unchanged."""

    def __init__(self, *args, box: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.box = box

    def add_noise(self):
        for p in self.params:
            p.summed_grad.clamp_(-self.box, self.box)
        super().add_noise()


class PerSampleLinear(torch.autograd.Function):
    """y = x Wᵀ + b, whose backward gives x its gradient g W as usual, and W and b each sample's
    own gradient in ``p.grad_sample`` (Opacus' attribute, which DPOptimizer clips and noises)
    instead of autograd's summed ``p.grad``. For a batch of n samples, each a row or a sequence of
    tokens t, with output gradients g:

        ∇_W ℓ_n = Σ_t g_{n,t} x_{n,t}ᵀ,   ∇_b ℓ_n = Σ_t g_{n,t}.

    These are the gradients Opacus' GradSampleModule computes for nn.Linear from a forward hook
    (which keeps x) and a full backward hook (which wraps the layer's inputs and outputs in extra
    autograd nodes). Computed in the layer's own backward, neither hook runs, and autograd's summed
    weight gradient, which DPOptimizer would replace anyway, is never computed (README,
    Performance, measures both). A layer called twice in one pass adds its two gradients, as
    Opacus does."""

    @staticmethod
    def forward(ctx, x, weight, bias, linear: nn.Linear):
        ctx.save_for_backward(x, weight)
        ctx.linear = linear  # the parameters to give per-sample gradients to
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        for p, per_sample in linear_per_sample_gradients(ctx.linear, x, grad_out).items():
            p.grad_sample = per_sample if p.grad_sample is None else p.grad_sample + per_sample
        return (grad_out @ weight if ctx.needs_input_grad[0] else None), None, None, None


def linear_per_sample_gradients(linear: nn.Linear, x: torch.Tensor, g: torch.Tensor) -> dict:
    """Σ_t g xᵀ and Σ_t g for each sample, for the trained ones of ``linear``'s weight and bias.
    The batched product is taken in the order CPU kernels run fast: Opacus computes gᵀx as n
    products (out × t)(t × in), and when out > in, as for LoRA's B (384 × 8), that skinny result
    runs about 5× slower than the same sums computed as (in × t)(t × out) and read transposed.
    Same numbers, summed in another order (tests/test_privacy.py)."""
    x = x.to(g.dtype)
    out = {}
    if linear.weight.requires_grad:
        if g.dim() == 3 and linear.out_features > linear.in_features:
            out[linear.weight] = torch.bmm(x.transpose(1, 2), g).transpose(1, 2)
        else:
            out[linear.weight] = torch.einsum("n...i,n...j->nij", g, x)
    if linear.bias is not None and linear.bias.requires_grad:
        out[linear.bias] = torch.einsum("n...k->nk", g)
    return out


def computes_own_per_sample_gradients(module: nn.Module) -> bool:
    """Within ``per_sample_gradients``: a plain nn.Linear whose weight is trained (LoRA's A and B,
    the sequence tower's maps) runs ``PerSampleLinear``; every other trained module, Opacus' hooks."""
    return type(module) is nn.Linear and module.weight.requires_grad


class GradSampleModuleBesideLinears(GradSampleModule):
    """Opacus' GradSampleModule, without hooks on the layers that compute their own per-sample
    gradients (``computes_own_per_sample_gradients``)."""

    def iterate_submodules(self, module: nn.Module):
        yield from (m for m in super().iterate_submodules(module) if not computes_own_per_sample_gradients(m))


@contextmanager
def per_sample_gradients(model: nn.Module):
    """Within: the module to run ``model`` through, so that each backward pass leaves every trained
    parameter's per-sample gradients in ``p.grad_sample`` for DPOptimizer: the trained linear
    maps compute theirs in their own backward (``PerSampleLinear``), the rest by Opacus' hooks.
    The gradients are Opacus' own to float rounding (tests/test_privacy.py,
    tests/per_example.py). The model leaves with nn.Linear.forward again, and without hooks."""
    linears = [m for m in model.modules() if computes_own_per_sample_gradients(m)]
    for linear in linears:
        linear.forward = partial(_per_sample_forward, linear)
    module = None
    try:
        module = GradSampleModuleBesideLinears(model, loss_reduction="sum")
        yield module
    finally:
        if module is not None:
            module.to_standard_module()
        for linear in linears:
            del linear.forward  # nn.Linear.forward again


def _per_sample_forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return PerSampleLinear.apply(x, linear.weight, linear.bias, linear)


def dp_steps(model, optimizer, samples, units, cap, collate, s, q, generator, canaries=None,
             box=None) -> list[float]:
    """``local_steps`` DP-SGD steps, each on a Poisson sample of privacy ``units`` (lists of indices
    into ``samples``; at most ``cap`` samples of a unit per step, None: all); see the module doc.
    With ``box``, the clipped sum is clamped to ±box per coordinate before the noise."""
    sampler = UniformWithReplacementSampler(num_samples=len(units), sample_rate=q, generator=generator,
                                            steps=s.local_steps)
    # expected_batch_size = batch-size, public: the noisy sum is divided by it, not by q·n.
    boxed = {} if box is None else {"box": box}
    optimizer = (DPOptimizer if box is None else BoxedSumDPOptimizer)(
        optimizer, noise_multiplier=s.noise_multiplier, max_grad_norm=s.max_grad_norm,
        expected_batch_size=s.batch_size, loss_reduction="mean", generator=generator, **boxed)
    if canaries is not None:
        canaries.attach(optimizer, q, s.max_grad_norm)
    losses = []
    with per_sample_gradients(model) as module:  # whatever fails, the model leaves as it came
        for sampled in sampler:
            optimizer.zero_grad(set_to_none=True)
            rows, owner = capped_rows([units[u] for u in sampled], cap, generator)
            if rows:
                losses.append(unit_gradients(module, collate([samples[i] for i in rows]), owner, len(sampled)))
            else:
                # An empty Poisson sample still releases a step: the noise alone. The encoder
                # cannot run on zero rows, so Opacus gets zero-row per-unit gradients.
                for p in module.parameters():
                    if p.requires_grad:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            optimizer.step()
    return losses


class GradientCanaries:
    """White-box audit canaries in DP-SGD, a site's own check that its noise is really added.

    A site whose data folder holds ``gradient-canaries.json`` (``{"seed": hex, "included": [bool]
    × m}``, written by whoever audits it: the simulator plays that part) runs m canaries through
    every DP-SGD step. Canary k is a random unit direction u_k in the space of the trained
    parameters (Andrew et al., ICLR 2024), drawn from the seed. An included canary is a privacy
    unit like any other: each step Poisson-samples it at the public rate q, and a sampled one adds
    its gradient C·u_k (norm C, as a clipped unit's) to the clipped sum before the noise. After
    the noise, the step's noisy sum g_t is observed along every direction:

        x_{t,k} = ⟨g_t, u_k⟩ / C = [k sampled at t] + ⟨data sum, u_k⟩ / C + N(0, σ²)   (near-orthogonal u).

    The rows x_t are appended to ``state/gradient-canaries/round-NNN.npy`` for the auditor
    (audit/empirical.py); DP-SGD's accounting covers every step's noisy sum, so they are within
    the site's guarantee and never leave the site. Included canaries leave the real examples'
    guarantee as it is (they are data-independent) and cost ~q·m/2 extra units per step.
    """

    FILE = "gradient-canaries.json"

    def __init__(self, spec: dict, out_file):
        self.seed = int(spec["seed"], 16) % 2**63  # torch seeds are 64-bit
        self.included = torch.tensor(spec["included"], dtype=torch.bool)
        self.out_file, self.rows = out_file, []

    def attach(self, optimizer, q: float, max_grad_norm: float) -> None:
        params = optimizer.params
        dim = sum(p.numel() for p in params)
        directions = torch.randn(len(self.included), dim, generator=torch.Generator().manual_seed(self.seed))
        directions = (directions / directions.norm(dim=1, keepdim=True)).to(params[0].device)
        sampler = torch.Generator().manual_seed(secrets.randbits(63))  # which canary joins which step: secret
        add_noise = optimizer.add_noise

        def add_noise_with_canaries():
            joins = self.included & (torch.rand(len(self.included), generator=sampler) < q)
            extra = max_grad_norm * directions[joins.to(directions.device)].sum(0)
            for p, part in zip(params, extra.split([p.numel() for p in params])):
                p.summed_grad.add_(part.view_as(p.summed_grad))
            add_noise()  # whatever noise this optimizer really adds
            noisy = torch.cat([p.grad.reshape(-1) for p in params])
            self.rows.append((directions @ noisy / max_grad_norm).cpu())

        optimizer.add_noise = add_noise_with_canaries

    def save(self) -> None:
        import numpy as np

        if not self.rows:  # no DP-SGD step ran
            return
        self.out_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(self.out_file, torch.stack(self.rows).numpy().astype(np.float32))


def capped_rows(sampled: list[list[int]], cap: int, generator) -> tuple[list[int], torch.Tensor]:
    """The sample rows of the sampled units, at most ``cap`` per unit drawn at random (None: all),
    and the position of each row's unit in the sample."""
    rows, owner = [], []
    for position, unit in enumerate(sampled):
        if cap is not None and len(unit) > cap:
            unit = [unit[i] for i in torch.randperm(len(unit), generator=generator)[:cap].tolist()]
        rows.extend(unit)
        owner.extend([position] * len(unit))
    return rows, torch.tensor(owner, dtype=torch.long)


def position_losses(logits: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every predicted position, (rows, positions), and which positions are
    predicted: one per row for examples, every non-padded slot for sequence windows."""
    if logits.dim() == 2:  # an example: one prediction
        logits, targets, seen = logits[:, None], targets[:, None], seen[:, None]
    predicted = targets != PAD
    logits = logits.masked_fill(seen, float("-inf"))
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return losses * predicted, predicted


def unit_gradients(module, batch, owner: torch.Tensor, num_units: int) -> float:
    """Backward on the rows of the sampled units; leaves each unit's mean gradient over its
    predicted positions in ``p.grad_sample`` (one row per unit, which DPOptimizer clips and
    noises). The mean loss."""
    inputs, targets, seen = batch
    owner = owner.to(device())
    losses, predicted = position_losses(module(**inputs), targets, seen)
    positions_per_unit = torch.zeros(num_units, device=owner.device).index_add_(0, owner, predicted.sum(1).float())
    # Σ_u (1/k_u) Σ_{i∈u} ℓ_i over the unit's k_u predicted positions: each row's per-sample
    # gradient comes out already divided by its unit's k_u.
    weighted = (losses.sum(1) / positions_per_unit[owner]).sum()
    with warnings.catch_warnings():  # the frozen embeddings take no gradient, by design
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        weighted.backward()
    rows_are_units = torch.equal(owner, torch.arange(num_units, device=owner.device))  # e.g. example-level DP
    for p in module.parameters():
        if p.requires_grad and not rows_are_units:  # else the per-row gradients already are the units'
            per_row = p.grad_sample
            p.grad_sample = per_row.new_zeros((num_units, *p.shape)).index_add_(0, owner, per_row)
    return float(losses.detach().sum() / predicted.sum())


def plain_steps(model, optimizer, samples, collate, s, generator) -> list[float]:
    """``local_steps`` non-private Adam steps on shuffled batches of ``batch-size`` samples."""
    loader = DataLoader(samples, batch_size=min(s.batch_size, len(samples)), shuffle=True, generator=generator,
                        collate_fn=collate)
    losses, steps = [], 0
    while steps < s.local_steps:
        for inputs, targets, seen in loader:
            optimizer.zero_grad(set_to_none=True)
            position, predicted = position_losses(model(**inputs), targets, seen)
            loss = position.sum() / predicted.sum()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
            if steps >= s.local_steps:
                break
    return losses


def evaluate(model, tokenizer, examples: list[Example], max_length: int) -> dict[str, float]:
    """Full-ranking HR@10, NDCG@10, Recall@20 over the whole catalog (item embeddings fresh)."""
    return metrics_from_ranks(ranks(model, tokenizer, examples, max_length))


def evaluation_sums(model, tokenizer, examples: list[Example], max_length: int) -> dict[str, float]:
    """Σ over users of HR@10, NDCG@10 and Recall@20 (each in [0, 1]), and the user count."""
    per_user = per_user_metrics(ranks(model, tokenizer, examples, max_length)) if examples else {}
    sums = {f"sum-{k}": float(per_user[k].sum()) if examples else 0.0 for k in METRICS}
    return {**sums, "count": float(len(examples))}


def ranks(model, tokenizer, examples: list[Example], max_length: int) -> torch.Tensor:
    scores = score_users(model, tokenizer, [ex.text for ex in examples], max_length,
                         sequences=[ex.seen for ex in examples])
    targets = torch.tensor([ex.target for ex in examples])
    return target_ranks(scores, targets, [ex.seen for ex in examples])
