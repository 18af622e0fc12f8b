"""Checking the per-example gradients DP-SGD clips (``client.train.per_sample_gradients``: the
trained linear maps' own backward, Opacus' hooks for the rest) against autograd on one example at
a time."""

from __future__ import annotations

import torch

from client.train import per_sample_gradients


# Per-sample gradients are computed analytically; against autograd on the single
# example they agree to float32 round-off. Tolerance: |Δ| <= 1e-5 + 1e-3·|g|.
RTOL, ATOL = 1e-3, 1e-5


def checked_per_example_gradients(model, collate, batch) -> dict[str, torch.Tensor]:
    """The per-example gradients of the batch's summed next-item loss, each asserted equal
    to autograd on that example alone; returned by parameter name for further checks."""
    def loss(module, examples):
        inputs, targets, seen = collate(examples)
        logits = module(**inputs).masked_fill(seen, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")

    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with per_sample_gradients(model) as module:
        loss(module, batch).backward()
        per_example = {n: p.grad_sample.detach().clone() for n, p in trainable.items()}
    for i, example in enumerate(batch):
        model.zero_grad(set_to_none=True)
        loss(model, [example]).backward()
        for name, p in trainable.items():
            got, expected = per_example[name][i], p.grad.detach()
            assert got.shape == expected.shape, name
            assert torch.allclose(got, expected, rtol=RTOL, atol=ATOL), (
                f"{name}: example {i} max |Δ| {(got - expected).abs().max():.3e}")
    return per_example
