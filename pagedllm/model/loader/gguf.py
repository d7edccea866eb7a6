"""GGUF files (as llama.cpp writes them) → a model config and named torch tensors.

Parsing and dequantization are the `gguf` package's; this module adds the checks a
user needs (every failure names the file and the problem), maps llama.cpp's tensor
names onto the Hugging Face names our models use, and undoes llama.cpp's Q/K row
permutation exactly as `transformers` does when it loads the same file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from pagedllm.model.config import (
    MAX_CONTEXT,
    MAX_VOCAB,
    MAX_WIDTH,
    ModelArchConfig,
    global_every,
)
from pagedllm.model.layers.quantized import QUANT_TYPES, QuantizedWeight
from pagedllm.model.loader.errors import ModelLoadError
from pagedllm.model.loader.gguf_header import check_gguf_header

GGUF_MAGIC = b"GGUF"

# Types we dequantize: every type the gguf package can dequantize.
_UNQUANTIZED = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
SUPPORTED_TYPES = _UNQUANTIZED | set(gguf_quants._type_traits)

# Architectures whose Q/K rows llama.cpp's converter permuted (for its interleaved rotary).
_PERMUTED_QK_ARCHS = {"llama", "mistral"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma normalises around both blocks: llama.cpp's ffn_norm is the norm before the MLP
_GEMMA_LAYER_NAMES = _LAYER_NAMES | {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER_NAMES = {"gemma3": _GEMMA_LAYER_NAMES}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _ARCH_LAYER_NAMES.get(architecture, _LAYER_NAMES)
    match = _LAYER_RE.match(gguf_name)
    if match is None or match.group(2) not in names:
        return None
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{names[kind]}.{suffix}"


def open_gguf(path: str | Path) -> GGUFReader:
    """Open and validate a GGUF file; any structural problem becomes a ModelLoadError."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(path, "no such file")
    if not path.is_file():
        raise ModelLoadError(path, "not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    check_gguf_header(path)  # every declared size fits the file: the reader stays in bounds
    try:
        reader = GGUFReader(path)
    except (
        ValueError,
        IndexError,
        KeyError,
        OverflowError,
        ZeroDivisionError,  # an alignment of 0, in gguf versions that do not check it
        MemoryError,
        UnicodeDecodeError,
    ) as e:
        raise ModelLoadError(path, f"truncated or corrupt GGUF file ({e})") from e
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                path,
                f"tensor {tensor.name!r} has unsupported quantization type "
                f"{tensor.tensor_type.name}",
            )
    return reader


def metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value metadata as Python values (strings, numbers, lists)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            out[key] = None
    return out


def read_config(path: str | Path, reader: GGUFReader | None = None) -> ModelArchConfig:
    """The architecture config stored in a GGUF file's metadata, every number range-checked."""
    reader = reader or open_gguf(path)
    meta = _Metadata(path, metadata(reader))
    arch = meta.raw.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(path, "metadata has no general.architecture")
    a = f"{arch}."
    tensor_names = {t.name for t in reader.tensors}
    layer_ids = [int(m.group(1)) for n in tensor_names if (m := _LAYER_RE.match(n))]
    # bounded by the file's own tensors, so a corrupt count cannot build 2³² layers
    num_layers = meta.integer(a + "block_count", high=max(layer_ids, default=-1) + 1)
    hidden = meta.integer(a + "embedding_length")
    num_heads = meta.integer(a + "attention.head_count")
    num_kv_heads = meta.integer(a + "attention.head_count_kv", num_heads, high=num_heads)
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            path, f"{num_heads} attention heads cannot be shared by {num_kv_heads} KV heads"
        )
    head_dim = meta.integer(a + "attention.key_length", 0, low=0)
    if not head_dim and hidden % num_heads:
        raise ModelLoadError(
            path,
            f"{a}embedding_length = {hidden} is not divisible by {a}attention.head_count = "
            f"{num_heads} (and {a}attention.key_length is not given)",
        )
    head_dim = head_dim or hidden // num_heads
    if head_dim < 2 or head_dim % 2:
        raise ModelLoadError(path, f"the head size {head_dim} is not an even number >= 2")
    tokens = meta.raw.get("tokenizer.ggml.tokens")
    vocab = meta.raw.get(a + "vocab_size") or (len(tokens) if isinstance(tokens, list) else 0)
    if not vocab:
        raise ModelLoadError(path, "cannot tell the vocabulary size (no vocab_size, no tokens)")
    template = meta.raw.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise ModelLoadError(path, "metadata tokenizer.chat_template is not a string")
    name = meta.raw.get("general.name")
    config = ModelArchConfig(
        architecture=arch,
        num_layers=num_layers,
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=meta.integer(a + "feed_forward_length"),
        vocab_size=meta.integer(a + "vocab_size", vocab, high=MAX_VOCAB),
        rms_norm_eps=meta.positive(a + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.positive(a + "rope.freq_base", 10000.0),
        rope_scaling=_rope_scaling(meta, a),
        max_position_embeddings=meta.integer(a + "context_length", 2048, high=MAX_CONTEXT),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.token_id("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.token_id("tokenizer.ggml.padding_token_id"),
        chat_template=template,
        name=name if isinstance(name, str) and name else Path(path).stem,
    )
    if arch == "gemma3":
        _gemma3_attention(config, meta, a)
    config.pooling_type = _LLAMA_CPP_POOLING.get(meta.raw.get(a + "pooling_type"))
    config.validate(path, _gguf_names(a))
    return config


# llama.cpp's enum llama_pooling_type: 1 mean, 2 cls, 3 last (0 none, 4 rank: not ours)
_LLAMA_CPP_POOLING = {1: "mean", 2: "cls", 3: "last"}

# Gemma 3 facts its GGUF files leave out, as llama.cpp fixes them: every 6th layer attends
# globally, the others slide with a rotary base of 10,000; queries are scaled by the head
# size, except in the 27B (62 layers), which scales by hidden size / heads.
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


def _gemma3_attention(config: ModelArchConfig, meta: _Metadata, a: str) -> None:
    config.sliding_window = meta.integer(a + "attention.sliding_window", 512, high=MAX_CONTEXT)
    config.layer_types = global_every(config.num_layers, GEMMA3_GLOBAL_EVERY)
    config.rope_local_theta = GEMMA3_LOCAL_ROPE_THETA
    if config.num_layers == 62:
        config.query_pre_attn_scalar = config.hidden_size / config.num_heads
    else:
        config.query_pre_attn_scalar = float(config.head_dim)
    if meta.raw.get(a + "final_logit_softcapping") is not None:
        config.final_logit_softcapping = meta.positive(a + "final_logit_softcapping", 1.0)


def _gguf_names(a: str) -> dict[str, str]:
    """ModelArchConfig fields → the metadata keys they come from, for error messages."""
    return {
        "num_layers": a + "block_count",
        "hidden_size": a + "embedding_length",
        "num_heads": a + "attention.head_count",
        "num_kv_heads": a + "attention.head_count_kv",
        "head_dim": a + "attention.key_length",
        "intermediate_size": a + "feed_forward_length",
        "vocab_size": a + "vocab_size",
        "rms_norm_eps": a + "attention.layer_norm_rms_epsilon",
        "rope_theta": a + "rope.freq_base",
        "max_position_embeddings": a + "context_length",
        "sliding_window": a + "attention.sliding_window",
    }


class _Metadata:
    """Typed, range-checked reads of metadata values; a bad one is a ModelLoadError naming it."""

    def __init__(self, path: str | Path, raw: dict[str, Any]) -> None:
        self.path = path
        self.raw = raw

    def integer(
        self, key: str, default: int | None = None, low: int = 1, high: int = MAX_WIDTH
    ) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise ModelLoadError(self.path, f"metadata key {key} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ModelLoadError(
                self.path, f"metadata {key} = {value!r} is not an integer in [{low}, {high}]"
            )
        return value

    def positive(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value > 0):
            raise ModelLoadError(self.path, f"metadata {key} = {value!r} is not a positive number")
        return float(value)

    def token_id(self, key: str) -> int | None:
        value = self.raw.get(key)
        return None if value is None else self.integer(key, low=0, high=MAX_VOCAB)


def _rope_scaling(meta: _Metadata, a: str) -> dict[str, Any] | None:
    kind = meta.raw.get(a + "rope.scaling.type")
    if kind in (None, "none") or not meta.raw.get(a + "rope.scaling.factor"):
        return None
    if not isinstance(kind, str):
        raise ModelLoadError(meta.path, f"metadata {a}rope.scaling.type is not a string")
    scaling: dict[str, Any] = {
        "rope_type": kind,
        "factor": meta.positive(a + "rope.scaling.factor", 1.0),
    }
    if meta.raw.get(a + "rope.scaling.original_context_length"):
        scaling["original_max_position_embeddings"] = meta.integer(
            a + "rope.scaling.original_context_length", high=MAX_CONTEXT
        )
    if kind == "yarn":
        for gguf_key, hf_key in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ("rope.scaling.attn_factor", "attention_factor"),
        ):
            if meta.raw.get(a + gguf_key) is not None:
                scaling[hf_key] = meta.positive(a + gguf_key, 1.0)
    return scaling


def dequantize(path: str | Path, tensor: Any, dtype: torch.dtype) -> torch.Tensor:
    """One reader tensor as a torch tensor of `dtype`, shaped [rows, cols] like torch weights."""
    try:
        values = gguf_quants.dequantize(tensor.data, tensor.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise ModelLoadError(path, f"tensor {tensor.name!r} cannot be dequantized: {e}") from e
    expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = np.ascontiguousarray(values).reshape(expected)
    if not values.flags.writeable:  # a view of the memory-mapped file: copy it out
        values = values.copy()
    return torch.from_numpy(values).to(dtype)


def load_gguf_tensors(path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file by its raw GGUF name, dequantized to `dtype`."""
    reader = open_gguf(path)
    return {t.name: dequantize(path, t, dtype) for t in reader.tensors}


def _check_rows_per_head(
    path: str | Path, name: str, value: torch.Tensor | QuantizedWeight, num_heads: int
) -> None:
    """A Q/K tensor's rows must split into heads of rotary pairs before it is un-permuted.

    The model checks every shape against the config later, but this reshape comes first.
    """
    if len(value.shape) == 0 or value.shape[0] % (2 * num_heads):
        raise ModelLoadError(
            path,
            f"tensor {name!r} has shape {tuple(value.shape)}: its rows do not split "
            f"into {num_heads} heads of rotary pairs",
        )


def reverse_permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (its convert script's `permute`).

    llama.cpp interleaves each head's rotary halves (pairs x0,x1 rotate together);
    Hugging Face keeps the halves apart (x_i rotates with x_{i+d/2}). The inverse
    regroups each head's rows from (d/2, 2) back to (2, d/2), as `transformers` does.
    """
    rows = weight.shape[0]
    head_dim_half = rows // num_heads // 2
    return (
        weight.reshape(num_heads, head_dim_half, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _tensor_value(
    path: str | Path, tensor: Any, name: str, dtype: torch.dtype, quantized: bool
) -> torch.Tensor | QuantizedWeight:
    """One tensor as the model keeps it: the file's blocks (`quantized`, for the types the
    kernels compute from), a 2-D F16/BF16 tensor in its own dtype, or `dtype` values."""
    kind = tensor.tensor_type
    matrix = len(tensor.shape) == 2
    if quantized and matrix and kind in QUANT_TYPES:
        try:
            return QuantizedWeight.from_gguf(tensor.data, kind)
        except ValueError as e:  # rows that do not hold whole blocks
            raise ModelLoadError(path, f"tensor {tensor.name!r}: {e}") from e
    if quantized and matrix and kind in _HALF_TYPES:
        return dequantize(path, tensor, _HALF_TYPES[kind])  # exact: half → float32 → half
    # rotary frequency factors stay in float32: they scale angles, not activations
    return dequantize(path, tensor, torch.float32 if name == "rope_freqs" else dtype)


_HALF_TYPES = {GGMLQuantizationType.F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}


def load_gguf(
    path: str | Path, dtype: torch.dtype, *, quantized: bool = False
) -> tuple[ModelArchConfig, dict[str, torch.Tensor | QuantizedWeight]]:
    """A GGUF model: its config and its tensors under Hugging Face names. With `quantized`
    (the CPU kernels are built), quantized matrices stay as the file's blocks, the only copy."""
    reader = open_gguf(path)
    config = read_config(path, reader)
    tensors: dict[str, torch.Tensor | QuantizedWeight] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, config.architecture)
        if name is None:
            continue
        value = _tensor_value(path, tensor, name, dtype, quantized)
        if config.architecture in _PERMUTED_QK_ARCHS:
            heads = None
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                heads = config.num_heads
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                heads = config.num_kv_heads
            if heads is not None:
                _check_rows_per_head(path, name, value, heads)
                if isinstance(value, QuantizedWeight):
                    value = value.map_rows(lambda rows, h=heads: reverse_permute_qk(rows, h))
                else:
                    value = reverse_permute_qk(value, heads)
        tensors[name] = value
    return config, tensors
