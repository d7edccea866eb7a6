"""One transformer layer of a small decode step as one C call (`decode_layer` in csrc).

At batch 1 a layer's five fused kernels cost ~7 ms of a ~10 ms step, and the Python
around them (five ctypes calls, two allocations, argument packing) another ~1 ms. Here the
layer's fixed parts (weights, norms, shapes, its KV cache) are packed once into a C struct,
a step's shared parts (rotary angles, slots, block tables) once per step, and each layer
is a single call that runs the five kernels back to back.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pagedllm import cpu_kernels
from pagedllm.attention import AttentionMetadata, KVCache, cpu_decode
from pagedllm.model.layers import quantized
from pagedllm.model.layers.quantized import QuantizedWeight

_INT, _PTR, _FLOAT = ctypes.c_int, ctypes.c_void_p, ctypes.c_float


class _PackedWeight(ctypes.Structure):
    _fields_ = [
        ("format", _INT),
        ("half", _INT),
        ("qs", _PTR),
        ("scales", _PTR),
        ("mins", _PTR),
        ("rows", _INT),
        ("cols", _INT),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _PackedWeight),
        ("o", _PackedWeight),
        ("gate_up", _PackedWeight),
        ("down", _PackedWeight),
        ("norm_1", _PTR),
        ("norm_2", _PTR),
        ("eps_1", _FLOAT),
        ("eps_2", _FLOAT),
        ("num_heads", _INT),
        ("num_kv_heads", _INT),
        ("head_dim", _INT),
        ("scale", _FLOAT),
        ("kv", _PTR),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("cos", _PTR),
        ("sin", _PTR),
        ("slots", _PTR),
        ("block_tables", _PTR),
        ("seq_lens", _PTR),
        ("max_blocks", _INT),
    ]


# decode_layer(layer, step, hidden, M, exact, attention, num_threads)
ARGTYPES = (_PTR, _PTR, _PTR, _INT, _INT, _PTR, _INT)
# decode_layers(layers, n, step, hidden, M, exact, attention, final_norm, eps, num_threads)
STACK_ARGTYPES = (_PTR, _INT, _PTR, _PTR, _INT, _INT, _PTR, _PTR, _FLOAT, _INT)


@functools.cache
def _built(name: str, argtypes: tuple):
    """Function `name` of the block kernels' source, at their level (None without them)."""
    kernels = quantized.kernels()
    if kernels is None:
        return None
    return cpu_kernels.kernel(quantized.SOURCE, name, argtypes, kernels.level)


def _kernel():
    return _built("decode_layer", ARGTYPES)


def _stack_kernel():
    return _built("decode_layers", STACK_ARGTYPES)


def available() -> bool:
    return (
        _kernel() is not None
        and _stack_kernel() is not None
        and cpu_decode.paged_decode_rope_kernel() is not None
    )


def _packed(w: QuantizedWeight) -> _PackedWeight:
    mins = None if w.mins is None else w.mins.data_ptr()
    rows, cols = w.shape
    return _PackedWeight(w.format, w.half, w.qs.data_ptr(), w.scales.data_ptr(), mins, rows, cols)


class DecodeLayer:
    """A layer's decode-step struct for one KV cache: weights, norms, shapes, cache."""

    def __init__(
        self,
        weights: tuple[QuantizedWeight, QuantizedWeight, QuantizedWeight, QuantizedWeight],
        norms: tuple[tuple[torch.Tensor, float], tuple[torch.Tensor, float]],
        num_heads: int,
        scale: float,
        kv_cache: KVCache,
    ) -> None:
        (norm_1, eps_1), (norm_2, eps_2) = norms
        self.kv_cache = kv_cache  # kept alive while its address is in the struct
        self.struct = _Layer(
            *(_packed(w) for w in weights),
            norm_1.data_ptr(),
            norm_2.data_ptr(),
            eps_1,
            eps_2,
            num_heads,
            kv_cache.num_kv_heads,
            kv_cache.head_dim,
            scale,
            cpu_decode.c_view(kv_cache),
        )
        self.pointer = ctypes.addressof(self.struct)

    def __call__(self, hidden: torch.Tensor, step: DecodeStep, exact: bool) -> torch.Tensor:
        """hidden [M, H] (M <= 16, float32, contiguous) updated in place by the layer."""
        status = _kernel()(
            self.pointer, step.pointer, hidden.data_ptr(), hidden.shape[0], exact,
            step.attention, torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"decode layer failed ({status})")
        return hidden


class DecodeStack:
    """Every layer of a model for one set of KV caches, then its final norm: a decode
    step's layers in one call."""

    def __init__(
        self,
        layers: list[DecodeLayer],
        kv_caches: list[KVCache],
        final_norm: tuple[torch.Tensor, float],
    ) -> None:
        self.layers, self.kv_caches = layers, kv_caches  # alive while their addresses are held
        self.pointers = (_PTR * len(layers))(*(layer.pointer for layer in layers))
        self.norm_weight, self.norm_eps = final_norm

    def __call__(self, hidden: torch.Tensor, step: DecodeStep, exact: bool) -> torch.Tensor:
        """hidden [M, H] (M <= 16, float32, contiguous) through every layer and the final
        norm, in place."""
        status = _stack_kernel()(
            self.pointers, len(self.layers), step.pointer, hidden.data_ptr(), hidden.shape[0],
            exact, step.attention, self.norm_weight.data_ptr(), self.norm_eps,
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"decode layers failed ({status})")
        return hidden


class DecodeStep:
    """What every layer of one decode step shares: rotary angles, slots, block tables."""

    def __init__(self, cos_sin: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> None:
        cos, sin = cos_sin
        tables = meta.decode_block_tables
        self.keep = (cos, sin, meta)  # alive while their addresses are in the struct
        self.struct = _Step(
            cos.data_ptr(),
            sin.data_ptr(),
            meta.slot_mapping.data_ptr(),
            tables.data_ptr(),
            meta.decode_seq_lens.data_ptr(),
            tables.shape[1],
        )
        self.pointer = ctypes.addressof(self.struct)
        self.attention = ctypes.cast(cpu_decode.paged_decode_rope_kernel(), _PTR).value
