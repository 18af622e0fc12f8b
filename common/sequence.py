"""The sequence tower: the order of a user's recent items, read as SASRec reads it, over the
items' text embeddings (as UniSRec does) instead of item ids.

For a history of catalog indices i_1 … i_L (most recent last, at most ``sequence-length``),
with e_i the normalised catalog embedding of item i (the model's ``item_embeddings`` buffer,
public and without gradient):

    x_t = A(P e_{i_t}) + p_t                       (A: a 2-layer MLP adaptor; p_t: learned, t from the oldest item)
    h_t = LN(Block_K(… Block_1(x) …))_t            (pre-LN transformer blocks, causal: slot t reads i_1 … i_t)
    δ_t = Pᵀ W_out h_t                             (W_out is zero at initialisation)

P is the identity, or with ``projection`` = k > 0 the k × text_dim matrix of the catalog
embeddings' top k principal directions (``fit_projection``): a function of the public catalog
alone, so it costs no privacy, and under DP-SGD the noise lands on fewer trained numbers (the
adaptor's first layer and W_out shrink by text_dim / k).

and the recommender scores item j after position t as s · cos(u, e_j) + δ_t · e_j + b_j (the
text-tower term only when the model has one, see common/model.py). At initialisation δ = 0, so
the untrained model (round 0) is the text tower with the popularity prior, unchanged.

Causal attention makes slot t's output the prediction from the first t items alone, so one pass
over a window of a user's sequence gives the prediction at every position (``all_positions``):
trained that way (``sequence-training``, as SASRec trains), a DP-SGD unit is a user with all of
its windows, and its gradient is that user's gradient.

Every trainable layer here (Linear, LayerNorm, Embedding) sees a batch-first input of one
sample per row, so Opacus' hooks give exact per-sample gradients; the catalog enters only
through the gradient-free buffer.
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

    def __init__(self, text_dim: int, length: int, dim: int = 32, layers: int = 1, heads: int = 2,
                 dropout: float = 0.0, projection: int = 0):
        super().__init__()
        if not 0 <= projection <= text_dim:
            raise ValueError(f"sequence-projection: {projection} is not in 0..{text_dim} (the text embeddings' size)")
        self.length = length
        # Pᵀ (text_dim × k), not a parameter and not saved: fit_projection sets it from the catalog.
        self.register_buffer("basis", torch.zeros(text_dim, projection) if projection else None, persistent=False)
        item_dim = projection or text_dim
        # An MLP, not one linear map: it read the frozen text embeddings better in an exploratory
        # non-private comparison (validation NDCG@10 0.112 against 0.098 after 40 epochs, one
        # run each, a script outside the repository; the README says so).
        self.item_in = nn.Sequential(nn.Linear(item_dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.position = nn.Embedding(length, dim)
        # Small, as GPT-2 does: at N(0, 1) (torch's default) the positions would drown the items'
        # projected embeddings (of order 1/√dim) and the tower would start out reading order only.
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, item_dim, bias=False)
        nn.init.zeros_(self.out.weight)
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def fit_projection(self, item_embeddings: torch.Tensor) -> None:
        """P: the top principal directions of the (centred) catalog embeddings, each signed so
        that its largest entry is positive, so every party computes the same P from the same catalog."""
        if self.basis is None:
            return
        centred = item_embeddings.double() - item_embeddings.double().mean(dim=0)
        directions = torch.linalg.svd(centred, full_matrices=False).Vh[:self.basis.shape[1]]
        largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
        self.basis.copy_((directions * largest.sign()).T.to(self.basis.dtype))

    def forward(self, history: torch.Tensor, item_embeddings: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """``history``: (batch, length) catalog indices, left-padded with PAD; at least the last
        slot of each row is an item. Returns δ at the last slot, (batch, text_dim), or with
        ``all_positions`` at every slot, (batch, length, text_dim)."""
        real = history != PAD
        length = history.shape[1]
        items = item_embeddings[history.clamp(min=0)]
        if self.basis is not None:
            items = items @ self.basis
        # Positions count from the first real item, so a prefix reads the same wherever its
        # padding puts it: slot t of a training window predicts as that prefix alone would.
        positions = (real.cumsum(dim=1) - 1).clamp(min=0)
        x = self.dropout(self.item_in(items) * real.unsqueeze(-1) + self.position(positions))
        # Slot t attends to the real items at or before t; a padded slot (whose output is never
        # read) to itself only, so no row of the attention is empty.
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
        itself = torch.eye(length, dtype=torch.bool, device=history.device)
        keep = ((causal & real[:, None, :]) | itself)[:, None]
        for block in self.blocks:
            x = self.dropout(block(x, keep))
        h = self.norm(x if all_positions else x[:, -1])
        return self.out(h) if self.basis is None else self.out(h) @ self.basis.T


def histories(sequences: list[tuple[int, ...]], length: int) -> torch.Tensor:
    """The last ``length`` items of each sequence, left-padded with PAD: the tower's input."""
    out = torch.full((len(sequences), length), PAD, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        recent = list(sequence[-length:])
        if recent:
            out[row, length - len(recent):] = torch.tensor(recent)
    return out
