"""Frozen-prefix caching: the encoder's lower, LoRA-free layers run once per distinct text.

LoRA sits in the top ``lora-layers`` of the encoder; the embeddings and every layer below the
first adapted one are frozen, carry no adapter and (dropout 0, as ``load_encoder`` builds them)
are deterministic functions of the text alone. So for a text t with tokens x_1..x_n,

    h(t) = layer_{k-1} ∘ … ∘ layer_0 ∘ embeddings (x_1..x_n)          (k = first adapted layer)

is the same in every round, every step and for every adapter, and the model's output on t is
``top_layers(h(t))``. A bidirectional encoder's hidden state at a real token never depends on
padding (padded keys are masked out), so h(t) is computed unpadded, stored once, and re-padded
with zeros for any batch: logits and per-sample gradients are those of the uncached model
(tested to 1e-5). The cache holds tensors on the model's device, least recently used evicted
beyond ``max_bytes``. Nothing private leaves the process: it is the site's own computation,
kept in its own memory and on its own disk: a deployed site (a new process per message) keeps
the catalog's states and its users' states in its state folder, as private as its data folder.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask


def first_adapted_layer(encoder: nn.Module) -> int:
    """Index of the lowest encoder layer holding a LoRA module (the layer count if none)."""
    layers = encoder.encoder.layer
    for i, layer in enumerate(layers):
        if any("lora_" in name for name, _ in layer.named_modules()):
            return i
    return len(layers)


def cacheable_layers(encoder: nn.Module) -> int:
    """How many lower layers can be cached: 0 (the cache is off) when LoRA reaches layer 0, the
    encoder is not a BERT-style stack (``embeddings`` + ``encoder.layer``), or dropout is on."""
    config = encoder.config
    if not (hasattr(encoder, "embeddings") and hasattr(getattr(encoder, "encoder", None), "layer")):
        return 0
    if config.is_decoder or config.hidden_dropout_prob or config.attention_probs_dropout_prob:
        return 0
    return first_adapted_layer(encoder)


def run_layers(encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
    for layer in layers:
        hidden = layer(hidden, mask)
    return hidden


def can_run_unpadded(layers) -> bool:
    """Whether ``run_layers_unpadded`` computes these layers: BERT-style layers (self-attention,
    then a feed-forward block, each closed by a residual LayerNorm) whose LoRA modules are plain
    LoRA (no DoRA or other variant)."""
    for layer in layers:
        try:  # every attribute run_layers_unpadded reads
            attention = layer.attention.self
            parts = (attention.query, attention.key, attention.value, layer.attention.output.dense,
                     layer.intermediate.dense, layer.output.dense)
            _ = (attention.num_attention_heads, attention.attention_head_size, attention.scaling,
                 layer.attention.output.LayerNorm, layer.intermediate.intermediate_act_fn, layer.output.LayerNorm)
        except AttributeError:
            return False
        if getattr(layer, "is_decoder", False) or any(getattr(m, "lora_variant", None) for m in parts):
            return False
    return True


def frozen_linear(module: nn.Module, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A frozen ``nn.Linear`` with its product computed in ``dtype`` (its weights cast once and
    kept) and returned in the tokens' dtype. bfloat16 keeps float32's range and 8 of its 24
    mantissa bits: each output is the float32 product to about 0.4 % of its terms' scale. The
    gradient flows back through the same cast product; the module's weights take none."""
    if dtype == tokens.dtype or not isinstance(module, nn.Linear) or module.weight.requires_grad:
        return module(tokens)
    key = (dtype, module.weight.data_ptr(), module.weight._version)
    if getattr(module, "_fedrec_low", (None,))[0] != key:
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        module._fedrec_low = (key, module.weight.detach().to(dtype), bias)
    _, weight, bias = module._fedrec_low
    return nn.functional.linear(tokens.to(dtype), weight, bias).to(tokens.dtype)


def run_layers_unpadded(hidden: torch.Tensor, attention_mask: torch.Tensor, layers,
                        frozen_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``run_layers`` with every linear map on the real tokens only, packed into one [tokens,
    hidden] matrix: a batch of user texts is about 40 % padding, which the padded layers compute
    and then throw away. Attention, which mixes a text's tokens, runs on the padded batch (its
    cost is small beside the linear maps'). LoRA's A and B also run on the padded batch, so
    Opacus' hooks on them see one row per sample and its per-sample gradients are unchanged
    (padded tokens carry no gradient). The result equals ``run_layers`` at every real token
    (to float rounding; tests/test_prefix_cache.py) and is zero at padded ones. Dropout must be
    off, as it is wherever the prefix cache is on. ``frozen_dtype`` (``frozen-precision``): the
    dtype of the frozen weights' products (``frozen_linear``); LoRA, attention, LayerNorm and
    everything Opacus sees stay in the hidden states' dtype."""
    real = attention_mask.bool()

    def padded(tokens: torch.Tensor) -> torch.Tensor:
        out = tokens.new_zeros(*real.shape, tokens.shape[-1])
        out[real] = tokens
        return out

    def linear(module: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        if not hasattr(module, "lora_A"):
            return frozen_linear(module, tokens, frozen_dtype)
        if module.disable_adapters or module.merged:
            return module(tokens)
        out = frozen_linear(module.base_layer, tokens, frozen_dtype)
        for name in module.active_adapters:
            if name in module.lora_A:
                lora = module.lora_B[name](module.lora_A[name](module.lora_dropout[name](padded(tokens))))
                out = out + lora[real] * module.scaling[name]
        return out

    def heads(attention: nn.Module, projection: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, heads, length, head size], as attention takes it."""
        shape = (*real.shape, attention.num_attention_heads, attention.attention_head_size)
        return padded(linear(projection, tokens)).view(shape).transpose(1, 2)

    keys = real[:, None, None, :]  # every query attends to its own text's real tokens
    tokens = hidden[real]
    for layer in layers:
        attention = layer.attention.self
        q, k, v = (heads(attention, m, tokens) for m in (attention.query, attention.key, attention.value))
        context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=attention.scaling)
        context = context.transpose(1, 2).flatten(2)[real]
        out = layer.attention.output
        tokens = out.LayerNorm(linear(out.dense, context) + tokens)
        inner = layer.intermediate.intermediate_act_fn(linear(layer.intermediate.dense, tokens))
        tokens = layer.output.LayerNorm(linear(layer.output.dense, inner) + tokens)
    return padded(tokens)


class PrefixCache:
    """h(t) for each distinct (text, max_length), LRU-bounded by ``max_bytes``."""

    def __init__(self, encoder: nn.Module, tokenizer, layers: int, max_bytes: int):
        self.encoder, self.tokenizer, self.layers, self.max_bytes = encoder, tokenizer, layers, max_bytes
        self.states: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.computed: set[tuple[str, int]] = set()  # since the last save_new
        self.disk: tuple[Path, set[str]] | None = None  # see keep_on_disk

    @torch.no_grad()
    def compute(self, texts: list[str], max_length: int, batch_size: int = 128) -> list[torch.Tensor]:
        """h(t) of each text, unpadded: [tokens, hidden] each. Texts are batched by token count, so
        little of the work is padding."""
        if not texts:
            return []
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))
        out: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenizer.pad({"input_ids": [tokens[i] for i in rows]}, return_tensors="pt").to(device)
            hidden = self.encoder.embeddings(input_ids=batch["input_ids"])
            hidden = run_layers(self.encoder, hidden, batch["attention_mask"], self.encoder.encoder.layer[:self.layers])
            for i, h, n in zip(rows, hidden, batch["attention_mask"].sum(1).tolist()):
                out[i] = h[:n].clone()
        return out

    def remember(self, key: tuple[str, int], state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if size > self.max_bytes:
            return
        if key in self.states:
            old = self.states.pop(key)
            self.bytes -= old.numel() * old.element_size()
        self.states[key] = state
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self.states.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()

    def lookup(self, texts: list[str], max_length: int) -> list[torch.Tensor]:
        keys = [(t, max_length) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.states))
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        computed = dict(zip(missing, self.compute([t for t, _ in missing], max_length)))
        if self.disk is not None:  # only a site that keeps them on disk needs to know (else unbounded)
            self.computed.update(missing)
        for key, state in computed.items():
            self.remember(key, state)
        found = []
        for key in keys:
            if key in self.states:
                self.states.move_to_end(key)
                found.append(self.states[key])
            else:  # larger than the whole bound, or evicted by this very batch
                found.append(computed[key])
        return found

    def inputs(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """The model's keyword inputs for ``texts``: h(t) zero-padded to the longest, and the mask."""
        states = self.lookup(texts, max_length)
        longest = max(s.shape[0] for s in states)
        hidden = states[0].new_zeros((len(states), longest, states[0].shape[1]))
        mask = torch.zeros((len(states), longest), dtype=torch.long, device=hidden.device)
        for row, state in enumerate(states):
            hidden[row, :state.shape[0]] = state
            mask[row, :state.shape[0]] = 1
        return {"prefix_states": hidden, "attention_mask": mask}

    def load_or_compute(self, texts: list[str], max_length: int, path: Path) -> None:
        """Public texts (the catalog): h(t) from ``path`` when it holds them, else computed and saved
        there, so a new process at the same site skips the lower layers entirely."""
        keys = [(t, max_length) for t in texts]
        if path.is_file():
            saved = torch.load(path, map_location=next(self.encoder.parameters()).device)
            if saved.get("keys") == keys and saved.get("layers") == self.layers:
                for key, state in zip(keys, saved["states"]):
                    self.remember(key, state)
                return
        states = self.lookup(texts, max_length)
        save_atomically({"keys": keys, "layers": self.layers, "states": [s.cpu() for s in states]}, path)

    def keep_on_disk(self, path: Path, exclude: set[str]) -> None:
        """Keep the states of every text but ``exclude`` (kept elsewhere) in ``path`` across
        processes: load what an earlier process saved there (if it fits this model), and let
        ``save_new`` add to it."""
        self.disk = (path, exclude)
        try:
            saved = torch.load(path, map_location=next(self.encoder.parameters()).device)
        except Exception:  # none yet, or damaged: computed again as needed
            return
        if isinstance(saved, dict) and saved.get("layers") == self.layers:
            for key, state in zip(saved["keys"], saved["states"]):
                self.remember(tuple(key), state)

    def save_new(self) -> None:
        """Write the kept states (within ``max_bytes``) if this process computed new ones."""
        if self.disk is None:
            return
        path, exclude = self.disk
        if all(text in exclude for text, _ in self.computed):
            return
        keys = [key for key in self.states if key[0] not in exclude]
        save_atomically({"keys": keys, "layers": self.layers, "states": [self.states[k].cpu() for k in keys]}, path)
        self.computed.clear()


def save_atomically(obj, path: Path) -> None:
    """``torch.save`` under a per-process temporary name, then a rename: two processes of one site
    may race, and a reader never sees half a file. An unwritable folder only costs the next
    process the computation."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
