"""Hugging Face model folders (config.json + *.safetensors, sharded or not) → config and tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pagedllm.model.config import ModelArchConfig, global_every
from pagedllm.model.loader.errors import ModelLoadError

# config.json "model_type" → our architecture names (as GGUF spells them)
_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
}


# ModelArchConfig fields → config.json keys, for error messages
_HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


def read_config(folder: str | Path) -> ModelArchConfig:
    """The architecture config of a Hugging Face folder, from its config.json; every size
    is checked, so a bad one is a ModelLoadError naming config.json and the key."""
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
    if model_type == "gemma3":
        raise ModelLoadError(
            config_path,
            "a multimodal Gemma 3 checkpoint (model_type gemma3): only its text model "
            "(model_type gemma3_text) is supported",
        )
    fields = _Fields(config_path, raw)
    hidden = fields.integer("hidden_size")
    num_heads = fields.integer("num_attention_heads")
    rope_key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    rope = raw.get(rope_key) or {}
    if not isinstance(rope, dict):
        raise ModelLoadError(config_path, f"{rope_key} = {rope!r} is not a JSON object")
    # Gemma 3 (transformers v5): rotary parameters per attention type
    local_rope = rope.get("sliding_attention")
    if isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    local_theta = raw.get("rope_local_base_freq")
    if isinstance(local_rope, dict):
        local_theta = local_rope.get("rope_theta", local_theta)
    # rope_parameters' rope_theta (transformers v5) wins over the top-level one
    rope_theta = _Fields(config_path, raw | rope).number("rope_theta", 10000.0)
    rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    rope_scaling.setdefault("rope_type", rope_scaling.pop("type", "default"))
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    config = ModelArchConfig(
        architecture=arch,
        num_layers=fields.integer("num_hidden_layers"),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=fields.integer("num_key_value_heads", num_heads),
        head_dim=_head_dim(fields, hidden, num_heads),
        intermediate_size=fields.integer("intermediate_size"),
        vocab_size=fields.integer("vocab_size"),
        rms_norm_eps=fields.number("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=None if rope_scaling["rope_type"] == "default" else rope_scaling,
        max_position_embeddings=fields.integer("max_position_embeddings", 2048),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=_first_int(raw.get("bos_token_id")),
        eos_token_id=_first_int(raw.get("eos_token_id")),
        pad_token_id=_first_int(raw.get("pad_token_id")),
        chat_template=tokenizer_config.get("chat_template"),
        name=folder.name,
        qk_norm=arch in ("qwen3", "gemma3"),
        query_pre_attn_scalar=_optional_number(fields, "query_pre_attn_scalar"),
        final_logit_softcapping=_optional_number(fields, "final_logit_softcapping"),
    )
    if local_theta is not None:
        local = _Fields(config_path, {"rope_local_base_freq": local_theta})
        config.rope_local_theta = local.number("rope_local_base_freq", 0)
    _sliding_window(config, fields)
    if raw.get("attn_logit_softcapping") is not None:
        raise ModelLoadError(config_path, "attn_logit_softcapping is not supported")
    config.validate(config_path, _HF_NAMES)
    return config


def _optional_number(fields: _Fields, key: str) -> float | None:
    return None if fields.raw.get(key) is None else fields.number(key, 0)


def _sliding_window(config: ModelArchConfig, fields: _Fields) -> None:
    """Which layers slide and how far: Mistral's every layer, Gemma 3's `layer_types` (or
    its every-Nth-global pattern); Qwen's window only with use_sliding_window."""
    raw = fields.raw
    if raw.get("sliding_window") is None or raw.get("use_sliding_window") is False:
        return
    config.sliding_window = fields.integer("sliding_window")
    types = raw.get("layer_types")
    if types is None and config.architecture == "gemma3":
        every = fields.integer("sliding_window_pattern", 6)
        if every < 1:
            raise ModelLoadError(fields.path, f"sliding_window_pattern = {every} is not positive")
        types = global_every(config.num_layers, every)
    if types is not None and not (
        isinstance(types, list) and all(isinstance(t, str) for t in types)
    ):
        raise ModelLoadError(fields.path, f"layer_types = {types!r} is not a list of names")
    config.layer_types = types


class _Fields:
    """Typed reads of config.json values; a wrong type is a ModelLoadError naming the key.

    Only types are checked here: ModelArchConfig.validate checks the ranges.
    """

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path = path
        self.raw = raw

    def _get(self, key: str, default: Any) -> Any:
        """The value of `key`; a missing or null one is `default` (missing if that is None)."""
        value = self.raw.get(key)
        if value is None:
            value = default
        if value is None:
            raise ModelLoadError(self.path, f"config.json is missing {key!r}")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelLoadError(self.path, f"{key} = {value!r} is not an integer")
        return value

    def number(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelLoadError(self.path, f"{key} = {value!r} is not a number")
        return float(value)


def _head_dim(fields: _Fields, hidden: int, num_heads: int) -> int:
    """config.json's head_dim, or the hidden size split evenly over the heads."""
    if fields.raw.get("head_dim") is not None:
        return fields.integer("head_dim")
    if num_heads <= 0:
        return 0  # validate() reports num_attention_heads, which it checks first
    if hidden % num_heads:
        raise ModelLoadError(
            fields.path,
            f"hidden_size = {hidden} is not divisible by num_attention_heads = {num_heads} "
            "(and head_dim is not given)",
        )
    return hidden // num_heads


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
