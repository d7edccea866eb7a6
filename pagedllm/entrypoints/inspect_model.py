"""`pagedllm inspect`: what a model file holds, read from its headers without loading weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pagedllm.attention.kv_cache import KV_CACHE_DTYPES
from pagedllm.model.config import ModelArchConfig
from pagedllm.model.loader import read_model_config, resolve_model_path
from pagedllm.model.loader.gguf import hf_tensor_name, metadata, open_gguf
from pagedllm.model.loader.gguf import read_config as read_gguf_config
from pagedllm.model.models.registry import validate_tensor_shapes
from pagedllm.worker.kv_cache import bytes_per_token

KV_DTYPES = ("float32", "bfloat16", "int8", "fp8")  # as --kv-cache-dtype names them


def _gguf_facts(
    path: Path,
) -> tuple[ModelArchConfig, int, Counter[str], list[str] | None, dict[str, tuple[int, ...]]]:
    reader = open_gguf(path)  # parsed once: the header of a real model takes seconds
    config = read_gguf_config(path, reader)
    shapes = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name, config.architecture)
        if name is not None:
            shapes[name] = tuple(int(d) for d in reversed(t.shape.tolist()))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    params = sum(int(t.n_elements) for t in reader.tensors)
    tokens = metadata(reader).get("tokenizer.ggml.tokens")
    return config, params, types, tokens, shapes


def _safetensors_tensors(
    folder: Path,
) -> tuple[int, Counter[str], list[str] | None, dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    params, types, shapes = 0, Counter(), {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = f.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                n = 1
                for d in sl.get_shape():
                    n *= d
                params += n
                types[sl.get_dtype()] += 1
    tokens = None
    tok_file = folder / "tokenizer.json"
    if tok_file.is_file():
        data = json.loads(tok_file.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab", {})
        if isinstance(vocab, dict):
            tokens = [""] * (max(vocab.values(), default=-1) + 1)
            for tok, i in vocab.items():
                tokens[i] = tok
            for added in data.get("added_tokens", []):
                if added["id"] < len(tokens):
                    tokens[added["id"]] = added["content"]
    return params, types, tokens, shapes


def describe(model: str | Path | None) -> dict[str, Any]:
    """The facts `inspect` prints, as a dict."""
    path = resolve_model_path(model)
    if path.is_file():
        config, params, types, tokens, shapes = _gguf_facts(path)
    else:
        config = read_model_config(path)
        params, types, tokens, shapes = _safetensors_tensors(path)
    validate_tensor_shapes(config, shapes, path)

    def token(i: int | None) -> str | None:
        if i is None:
            return None
        text = tokens[i] if tokens and 0 <= i < len(tokens) else "?"
        return f"{i} {text!r}"

    return {
        "path": str(path),
        "name": config.name,
        "architecture": config.architecture,
        "parameters": params,
        "tensor types": dict(sorted(types.items())),
        "layers": config.num_layers,
        "hidden size": config.hidden_size,
        "heads (q/kv)": f"{config.num_heads}/{config.num_kv_heads}",
        "head dim": config.head_dim,
        "context length": config.max_position_embeddings,
        "vocabulary size": config.vocab_size,
        "rope": f"theta={config.rope_theta:g} scaling={config.rope_scaling or 'none'}",
        "attention": _attention_layout(config),
        "bos token": token(config.bos_token_id),
        "eos token": token(config.eos_token_id),
        "pad token": token(config.pad_token_id),
        "chat template": "yes" if config.chat_template else "no",
        "kv bytes per token": {
            name: bytes_per_token(config, KV_CACHE_DTYPES[name]) for name in KV_DTYPES
        },
    }


def _attention_layout(config: ModelArchConfig) -> str:
    """Which layers see everything and which a sliding window (and their rotary base)."""
    windows = [config.layer_window(i) for i in range(config.num_layers)]
    sliding = sum(w is not None for w in windows)
    if not sliding:
        return f"full in all {config.num_layers} layers"
    base = f", rope theta {config.rope_local_theta:g}" if config.rope_local_theta else ""
    window = f"sliding ({config.sliding_window}-token window{base}) in {sliding} layers"
    full = [str(i) for i, w in enumerate(windows) if w is None]
    return f"{window}, full in {', '.join(full)}" if full else window


def format_description(facts: dict[str, Any]) -> str:
    width = max(len(k) for k in facts)
    lines = []
    for key, value in facts.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f} M)"
        elif isinstance(value, dict):
            value = ", ".join(
                f"{k}: {v:,}" if isinstance(v, int) else f"{k}: {v}" for k, v in value.items()
            )
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
