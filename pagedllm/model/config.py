"""Architecture hyper-parameters of a loaded model, read from GGUF metadata or config.json."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bounds on config numbers, far beyond any real model, so a corrupt value fails at load
# rather than building billions of layers or a rotary table of 2³² positions.
MAX_WIDTH = 1 << 20  # hidden size, FFN size, heads, head size
MAX_LAYERS = 1 << 12
MAX_CONTEXT = 1 << 24
MAX_VOCAB = 1 << 24

# Every size a model is built from, with its upper bound.
_SIZE_BOUNDS = {
    "num_layers": MAX_LAYERS,
    "hidden_size": MAX_WIDTH,
    "num_heads": MAX_WIDTH,
    "num_kv_heads": MAX_WIDTH,
    "head_dim": MAX_WIDTH,
    "intermediate_size": MAX_WIDTH,
    "vocab_size": MAX_VOCAB,
    "max_position_embeddings": MAX_CONTEXT,
}
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")


@dataclass
class ModelArchConfig:
    """What the model classes need to build themselves; the same for every file format."""

    architecture: str  # the file's name for it: "llama", "qwen2", ...
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style rope parameters: {"rope_type": "linear"|"dynamic"|"yarn"|"llama3", "factor": ..., ...}
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each query and key head before the rotation (Qwen3)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    name: str = ""
    # Attention variants (Gemma 3, Mistral). layer_types[i] is "sliding_attention" (the
    # layer sees the last `sliding_window` positions) or "full_attention"; None with a
    # sliding_window: every layer slides.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # sliding layers' rotary base, where it differs
    query_pre_attn_scalar: float | None = None  # attention scale = its -1/2 power (Gemma)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    pooling_type: str | None = None  # an embedding model's pooling, where its file says
    extra: dict[str, Any] = field(default_factory=dict)

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None where it attends to every position."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def validate(self, path: str | Path, names: Mapping[str, str] | None = None) -> None:
        """Refuse sizes no model can have, before any layer or table is built from them.

        Zero, negative or absurd sizes would otherwise surface deep in the model as a
        ZeroDivisionError or a huge allocation. Raises ModelLoadError naming `path` and the
        field, spelled as the file spells it (`names` maps our field names to the file's).
        """
        # imported here: the loader package imports this module
        from pagedllm.model.loader.errors import ModelLoadError

        problem = self._problem(names or {})
        if problem is not None:
            raise ModelLoadError(path, problem)

    def _problem(self, names: Mapping[str, str]) -> str | None:
        """The first thing wrong with the sizes, or None."""

        def name(attr: str) -> str:
            return names.get(attr, attr)

        for attr, high in _SIZE_BOUNDS.items():
            value = getattr(self, attr)
            if not _is_int(value) or not 1 <= value <= high:
                return f"{name(attr)} = {value!r} is not an integer in [1, {high}]"
        for attr in _POSITIVE_FLOATS:
            value = getattr(self, attr)
            if not _is_number(value) or not (math.isfinite(value) and value > 0):
                return f"{name(attr)} = {value!r} is not a positive number"
        if self.num_heads % self.num_kv_heads:
            return (
                f"{name('num_heads')} = {self.num_heads} is not divisible by "
                f"{name('num_kv_heads')} = {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            return f"{name('head_dim')} = {self.head_dim} is odd (rotary embeddings need pairs)"
        window = self.sliding_window
        if window is not None and not (_is_int(window) and 1 <= window <= MAX_CONTEXT):
            return f"{name('sliding_window')} = {window!r} is not an integer in [1, {MAX_CONTEXT}]"
        kinds = ("sliding_attention", "full_attention")
        types = self.layer_types
        if types is not None and (len(types) != self.num_layers or set(types) - set(kinds)):
            return f"{name('layer_types')} must name {self.num_layers} layers, each one of {kinds}"
        for attr in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, attr)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                return f"{name(attr)} = {value!r} is not a positive number"
        return None


def global_every(num_layers: int, every: int) -> list[str]:
    """`layer_types` where every `every`-th layer attends globally and the others slide
    (Gemma's pattern, as its GGUFs and older config.json files leave it implied)."""
    return [
        "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)
    ]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
