"""The sequence tower: the order of a user's recent items, as a correction to the user vector.

For an example whose history is the catalog indices i_1 … i_L (most recent last, at most
``sequence-length``), with e_i the normalised catalog embedding of item i (the model's
``item_embeddings`` buffer, public and without gradient):

    x_t = W_in e_{i_t} + p_t                       (p_t: a learned position embedding)
    h   = LN(Block_K(… Block_1(x) …))_L            (pre-LN transformer blocks, padding masked)
    δ   = W_out h                                  (W_out is zero at initialisation)

and the recommender scores item j as s · cos(u, e_j) + δ · e_j + b_j. At initialisation δ = 0,
so the untrained model (round 0) is the text tower with the popularity prior, unchanged; the
sequence tower only adds what training finds.

Every trainable layer here (Linear, LayerNorm, Embedding) sees a batch-first input of one
example per row, so Opacus' hooks give exact per-example gradients; the catalog enters only
through the gradient-free buffer. One example is one (history, next item) pair, as in the
text tower, so the privacy unit is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

PAD = -1  # the history index of an empty slot (histories are left-padded)


class Block(nn.Module):
    """One pre-LN transformer block: self-attention over the history, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).split(dim, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = x + self.attention_out(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.mlp_norm(x))


class SequenceTower(nn.Module):
    """δ(history): see the module docstring. ``length`` is the longest history it reads."""

    def __init__(self, text_dim: int, length: int, dim: int = 32, layers: int = 1, heads: int = 2):
        super().__init__()
        self.length = length
        self.item_in = nn.Linear(text_dim, dim)
        self.position = nn.Embedding(length, dim)
        # Small, as GPT-2 does: at N(0, 1) (torch's default) the positions would drown the items'
        # projected embeddings (of order 1/√dim) and the tower would start out reading order only.
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, text_dim, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, history: torch.Tensor, item_embeddings: torch.Tensor) -> torch.Tensor:
        """``history``: (batch, length) catalog indices, left-padded with PAD; at least the last
        slot of each row is an item. Returns δ, (batch, text_dim)."""
        real = history != PAD
        items = item_embeddings[history.clamp(min=0)] * real.unsqueeze(-1)
        positions = torch.arange(history.shape[1], device=history.device).expand_as(history)
        x = self.item_in(items) + self.position(positions)
        # Every slot attends to the real items only; a padded slot's output is never read.
        keep = real[:, None, None, :]
        for block in self.blocks:
            x = block(x, keep)
        return self.out(self.norm(x[:, -1]))


def histories(sequences: list[tuple[int, ...]], length: int) -> torch.Tensor:
    """The last ``length`` items of each sequence, left-padded with PAD: the tower's input."""
    out = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        recent = list(sequence[-length:])
        if recent:
            out[row, length - len(recent):] = torch.tensor(recent)
    return out
