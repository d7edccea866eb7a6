"""Architecture name (as GGUF's general.architecture spells it) → model class."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pagedllm.model.config import ModelArchConfig
from pagedllm.model.loader.errors import ModelLoadError
from pagedllm.model.models.gemma3 import Gemma3ForCausalLM
from pagedllm.model.models.llama import LlamaForCausalLM, check_shapes

# Mistral, Qwen2 and Qwen3 are Llama with differences the config carries (Mistral's
# sliding window, Qwen2's QKV bias, Qwen3's per-head Q/K norms).
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def model_class_for(architecture: str, path: str | Path) -> type[nn.Module]:
    """The class for an architecture, or a ModelLoadError naming the supported ones."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ModelLoadError(
            path, f"unknown architecture {architecture!r} (supported: {supported})"
        ) from None


def validate_tensor_shapes(
    config: ModelArchConfig, shapes: dict[str, tuple[int, ...]], path: str | Path
) -> None:
    """Check a file's tensor names and shapes against its architecture without loading data."""
    cls = model_class_for(config.architecture, path)
    with torch.device("meta"):  # no memory: only the expected shapes are wanted
        expected = cls(config).expected_shapes()
    check_shapes(expected, shapes, path)
