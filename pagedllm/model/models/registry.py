"""Architecture name (as GGUF's general.architecture spells it) → model class."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pagedllm.model.loader.errors import ModelLoadError
from pagedllm.model.models.llama import LlamaForCausalLM

# Mistral and Qwen2 are Llama with small differences the config carries
# (sliding window unused at these lengths; Qwen2's QKV bias).
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
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
