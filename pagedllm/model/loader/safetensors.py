"""Hugging Face model folders (config.json + *.safetensors, sharded or not) → config and tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pagedllm.model.config import ModelArchConfig
from pagedllm.model.loader.errors import ModelLoadError

# config.json "model_type" → our architecture names (as GGUF spells them)
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def read_config(folder: str | Path) -> ModelArchConfig:
    """The architecture config of a Hugging Face folder, from its config.json."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(folder, "folder has no config.json")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(config_path, f"not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(config_path, "config.json is not a JSON object")
    model_type = raw.get("model_type")
    arch = _MODEL_TYPES.get(model_type, model_type)
    if not isinstance(arch, str):
        raise ModelLoadError(config_path, "config.json has no model_type")

    def need(key: str) -> Any:
        if key not in raw:
            raise ModelLoadError(config_path, f"config.json is missing {key!r}")
        return raw[key]

    hidden = int(need("hidden_size"))
    num_heads = int(need("num_attention_heads"))
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    rope_scaling.setdefault("rope_type", rope_scaling.pop("type", "default"))
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    return ModelArchConfig(
        architecture=arch,
        num_layers=int(need("num_hidden_layers")),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden // num_heads),
        intermediate_size=int(need("intermediate_size")),
        vocab_size=int(need("vocab_size")),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=None if rope_scaling["rope_type"] == "default" else rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=_first_int(raw.get("bos_token_id")),
        eos_token_id=_first_int(raw.get("eos_token_id")),
        pad_token_id=_first_int(raw.get("pad_token_id")),
        chat_template=tokenizer_config.get("chat_template"),
        name=folder.name,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"not valid JSON ({e})") from e
    return value if isinstance(value, dict) else {}


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(index, "index has no weight_map")
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(folder, "folder has no *.safetensors files")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f, "shard named in the index is missing")
    return files


def load_safetensors(
    folder: str | Path, dtype: torch.dtype
) -> tuple[ModelArchConfig, dict[str, torch.Tensor]]:
    """A Hugging Face folder's config and every tensor under its own name, in `dtype`."""
    folder = Path(folder)
    config = read_config(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[name] = f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(file, f"cannot read safetensors file ({e})") from e
    return config, tensors
