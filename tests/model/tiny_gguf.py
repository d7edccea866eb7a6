"""Writes small Llama-shaped GGUF files for loader tests (random weights, real layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf import quants as gguf_quants

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 64, 4, 2, 128, 100, 2


def tiny_tensors(vocab: int = VOCAB) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
        }
    return {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    drop: str | None = None,
    reshape: tuple[str, tuple[int, ...]] | None = None,
    raw_type: tuple[str, GGMLQuantizationType] | None = None,
    with_vocab: bool = False,
    extra: dict[str, str] | None = None,
    quantize: GGMLQuantizationType | None = None,
    vocab: int = VOCAB,
) -> Path:
    """A 2-layer Llama GGUF; optionally without one tensor, with one of the wrong shape,
    or with one stored as raw bytes of another GGML type. `with_vocab` adds tokenizer
    metadata (string, integer and float arrays and a chat template) for header fuzzing;
    `extra` replaces (or adds) metadata keys with string values, for wrongly typed ones;
    `quantize` stores every matrix in that type (gguf's own quantizer); `vocab` sizes
    the embedding (a real tokenizer's size makes a random draft model for it)."""
    extra = extra or {}
    writer = GGUFWriter(str(path), arch=arch)
    for key, value in {
        "block_count": LAYERS,
        "embedding_length": HIDDEN,
        "feed_forward_length": FFN,
        "attention.head_count": HEADS,
        "attention.head_count_kv": KV_HEADS,
        "context_length": 256,
        "vocab_size": vocab,
    }.items():
        if f"{arch}.{key}" not in extra:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, text in extra.items():
        writer.add_key_value(key, text, GGUFValueType.STRING)
    if with_vocab:
        writer.add_token_list([f"tok{i}" for i in range(VOCAB)])
        writer.add_token_scores([float(-i) for i in range(VOCAB)])
        writer.add_token_types([1] * VOCAB)
        writer.add_eos_token_id(2)
        writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, value in tiny_tensors(vocab).items():
        if name == drop:
            continue
        if reshape and name == reshape[0]:
            value = np.zeros(reshape[1], dtype=np.float32)
        if raw_type and name == raw_type[0]:
            block, type_size = GGML_QUANT_SIZES[raw_type[1]]
            byte_shape = (value.shape[0], value.shape[1] // block * type_size)
            raw = np.zeros(byte_shape, np.uint8)
            writer.add_tensor(name, raw, raw_shape=byte_shape, raw_dtype=raw_type[1])
            continue
        if quantize is not None and value.ndim == 2:
            raw = gguf_quants.quantize(value, quantize)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=quantize)
            continue
        writer.add_tensor(name, value)
    return finish(writer, path)


def finish(writer: GGUFWriter, path: Path) -> Path:
    """Write a GGUF whose metadata and tensors have been added."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
