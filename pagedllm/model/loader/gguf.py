"""GGUF files (as llama.cpp writes them) → a model config and named torch tensors.

Parsing and dequantization are the `gguf` package's; this module adds the checks a
user needs (every failure names the file and the problem), maps llama.cpp's tensor
names onto the Hugging Face names our models use, and undoes llama.cpp's Q/K row
permutation exactly as `transformers` does when it loads the same file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from pagedllm.model.config import ModelArchConfig
from pagedllm.model.layers.linear import BLOCK_QUANT_TYPES, BlockQuantWeight
from pagedllm.model.loader.errors import ModelLoadError

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
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor, or None for tensors we do not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


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
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"truncated or corrupt GGUF file ({e})") from e
    file_size = os.path.getsize(path)
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                path,
                f"tensor {tensor.name!r} has unsupported quantization type "
                f"{tensor.tensor_type.name}",
            )
        block, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
        if tensor.n_elements % block:
            raise ModelLoadError(path, f"tensor {tensor.name!r} is not a whole number of blocks")
        n_bytes = tensor.n_elements // block * type_size
        if tensor.data_offset + n_bytes > file_size:
            raise ModelLoadError(
                path,
                f"truncated: tensor {tensor.name!r} needs bytes up to "
                f"{tensor.data_offset + n_bytes}, the file has {file_size}",
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
    """The architecture config stored in a GGUF file's metadata."""
    reader = reader or open_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(path, "metadata has no general.architecture")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if required and value is None:
            raise ModelLoadError(path, f"metadata key {arch}.{key} is missing")
        return value

    hidden = int(get("embedding_length", required=True))
    num_heads = int(get("attention.head_count", required=True))
    num_kv_heads = int(get("attention.head_count_kv", num_heads))
    head_dim = int(get("attention.key_length", 0) or hidden // num_heads)
    tensor_names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ModelLoadError(path, "cannot tell the vocabulary size (no vocab_size, no tokens)")
    return ModelArchConfig(
        architecture=arch,
        num_layers=int(get("block_count", required=True)),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length", required=True)),
        vocab_size=int(vocab),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(get),
        max_position_embeddings=int(get("context_length", 2048)),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_int_or_none(meta.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_int_or_none(meta.get("tokenizer.ggml.eos_token_id")),
        pad_token_id=_int_or_none(meta.get("tokenizer.ggml.padding_token_id")),
        chat_template=meta.get("tokenizer.chat_template"),
        name=str(meta.get("general.name") or Path(path).stem),
    )


def _rope_scaling(get: Any) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    original = get("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    if kind == "yarn":
        for gguf_key, hf_key in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
            ("rope.scaling.attn_factor", "attention_factor"),
        ):
            if get(gguf_key) is not None:
                scaling[hf_key] = float(get(gguf_key))
    return scaling


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


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


def load_gguf(
    path: str | Path, dtype: torch.dtype, *, keep_blocks: bool = False
) -> tuple[ModelArchConfig, dict[str, torch.Tensor], dict[str, BlockQuantWeight]]:
    """A GGUF model: its config, its tensors under Hugging Face names, and (with
    `keep_blocks`) the Q4_0/Q4_1/Q8_0 weights also as their blocks, for the quantized
    small-batch matmuls of `Linear`."""
    reader = open_gguf(path)
    config = read_config(path, reader)
    tensors: dict[str, torch.Tensor] = {}
    blocks: dict[str, BlockQuantWeight] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        # rotary frequency factors stay in float32: they scale angles, not activations
        value = dequantize(path, tensor, torch.float32 if name == "rope_freqs" else dtype)
        block = None
        if keep_blocks and tensor.tensor_type in BLOCK_QUANT_TYPES and value.dim() == 2:
            block = BlockQuantWeight.from_gguf(tensor.data, tensor.tensor_type)
        if config.architecture in _PERMUTED_QK_ARCHS:
            heads = None
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                heads = config.num_heads
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                heads = config.num_kv_heads
            if heads is not None:
                value = reverse_permute_qk(value, heads)
                if block is not None:
                    block = block.map_rows(lambda rows, h=heads: reverse_permute_qk(rows, h))
        tensors[name] = value
        if block is not None:
            blocks[name] = block
    return config, tensors, blocks
