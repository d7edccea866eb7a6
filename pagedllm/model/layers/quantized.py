"""Weights kept as a GGUF file's quantized blocks: the only copy of a quantized tensor.

`QuantizedWeight` wraps the file's bytes ([rows, bytes per row], memory-mapped when the
file allows) and computes from them through `csrc/quant_matmul.c`:
  - small batches (decode): int8 dot products per block, as llama.cpp does (or, `exact`,
    float32 products that match a float32 matmul over gguf's dequantization);
  - larger batches (prefill, many sequences): a tile of rows at a time is dequantized
    into a small scratch tensor and multiplied by torch (oneDNN), in bfloat16 where the
    CPU has bf16 units (AMX/AVX512-BF16) and float32 otherwise or when `exact`;
  - embeddings: the rows of the looked-up tokens, dequantized.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pagedllm import cpu_kernels

T = GGMLQuantizationType
SOURCE = Path(__file__).resolve().parent / "csrc" / "quant_matmul.c"
QUANT_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K})
MAX_ROWS = 16  # the most rows of x one call of the block kernel takes (MAX_ROWS in the C)
# Batches of at most this many rows use the block kernel; larger ones dequantized tiles.
# Measured crossover (SmolLM2-135M layers, BENCHMARKS.md): see `bench_kernels.py`.
SMALL_BATCH = 16
TILE_BYTES = 4 << 20  # one dequantized tile (4 MiB measured best of 1, 4 and whole matrices)

_INT, _LONG, _PTR = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
# quant_matmul(type, w, row_bytes, N, K, x, ldx, M, y, ldy, exact, op, norm_weight, eps,
#              accumulate, num_threads)
MATMUL_ARGS = (_INT, _PTR, _LONG, _INT, _INT, _PTR, _LONG, _INT, _PTR, _LONG, _INT, _INT, _PTR)
MATMUL_ARGS += (ctypes.c_float, _INT, _INT)
# What the kernel does to x first (the C enum) and whether it adds y to the output.
PLAIN, RMS_NORM, SILU_MUL = 0, 1, 2
# dequantize_rows(type, w, row_bytes, K, ids, n, out, bf16, num_threads)
DEQUANT_ARGS = (_INT, _PTR, _LONG, _INT, _PTR, _INT, _PTR, _INT, _INT)


# prepare_rows(x, ldx, M, K, op, norm_weight, eps, out, num_threads)
PREPARE_ARGS = (_PTR, _LONG, _INT, _INT, _INT, _PTR, ctypes.c_float, _PTR, _INT)


@dataclass(frozen=True)
class Kernels:
    matmul: Callable[..., int]
    dequantize: Callable[..., int]
    prepare: Callable[..., int]
    level: str


@functools.cache
def kernels(level: str | None = None) -> Kernels | None:
    """The block kernels built for `level` (default: the best the CPU runs), or None where
    they cannot be built (then weights are dequantized at load instead)."""
    level = level or cpu_kernels.best_level()
    matmul = cpu_kernels.kernel(SOURCE, "quant_matmul", MATMUL_ARGS, level)
    dequant = cpu_kernels.kernel(SOURCE, "dequantize_rows", DEQUANT_ARGS, level)
    prepare = cpu_kernels.kernel(SOURCE, "prepare_rows", PREPARE_ARGS, level)
    if matmul is None or dequant is None or prepare is None:
        return None
    return Kernels(matmul, dequant, prepare, level)


def fast_tile_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (several times float32), else float32."""
    flags = cpu_kernels.cpu_flags()
    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & flags else torch.float32


def _ptr(t: torch.Tensor | np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data)


@dataclass
class QuantizedWeight:
    """A [rows, cols] weight as the file's blocks of `qtype`, one row of bytes per row."""

    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, bytes per row], read-only when memory-mapped
    cols: int
    level: str | None = None  # kernel level; None: the best the CPU runs

    @classmethod
    def from_gguf(cls, raw: np.ndarray, qtype: GGMLQuantizationType) -> QuantizedWeight:
        """From a GGUF tensor's bytes as gguf's reader gives them: uint8 [rows, bytes per row]."""
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        return cls(qtype, raw, raw.shape[1] // block_bytes * block)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.cols

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def _kernels(self) -> Kernels:
        found = kernels(self.level)
        if found is None:
            raise RuntimeError("the quantized-weight kernels are not built on this machine")
        return found

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedWeight:
        """The same weight with its rows rearranged by `fn` (acting on dim 0 of the bytes)."""
        rows = fn(torch.from_numpy(np.array(self.data)))
        return QuantizedWeight(self.qtype, rows.contiguous().numpy(), self.cols, self.level)

    @staticmethod
    def cat(parts: Sequence[QuantizedWeight]) -> QuantizedWeight | None:
        """Rows of several weights stacked (fused QKV, gate/up), or None when they differ in
        type or width (a Q4_K_M file may store V in Q6_K beside Q/K in Q4_K)."""
        first = parts[0]
        if any(p.qtype != first.qtype or p.cols != first.cols for p in parts):
            return None
        return QuantizedWeight(
            first.qtype, np.concatenate([p.data for p in parts]), first.cols, first.level
        )

    def dequantize(
        self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows [start, stop) as `dtype` (float32 equals gguf's dequantization exactly)."""
        stop = self.shape[0] if stop is None else stop
        out = torch.empty(stop - start, self.cols, dtype=dtype)
        self._dequantize(self.data[start:stop], None, out)
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 rows `ids` (an embedding lookup); ids must lie in [0, rows)."""
        ids = ids.to(torch.int64).contiguous()
        if ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < self.shape[0]):
            raise IndexError(f"row ids out of range [0, {self.shape[0]})")
        out = torch.empty(*ids.shape, self.cols, dtype=torch.float32)
        self._dequantize(self.data, ids, out)
        return out

    def _dequantize(self, data: np.ndarray, ids: torch.Tensor | None, out: torch.Tensor) -> None:
        n = out.numel() // self.cols
        status = self._kernels().dequantize(
            int(self.qtype),
            _ptr(data),
            data.shape[1],
            self.cols,
            None if ids is None else _ptr(ids),
            n,
            _ptr(out),
            int(out.dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"dequantizing {self.qtype.name} rows failed ({status})")

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None, exact: bool = False):
        """out[M, rows] = x[M, cols] @ w^T for float32 x; `out` may be a column slice of a
        wider float32 tensor (fused layers write their parts in place)."""
        x = x.contiguous()
        if out is None:
            out = torch.empty(x.shape[0], self.data.shape[0], dtype=torch.float32)
        if x.shape[0] <= SMALL_BATCH:
            for start in range(0, x.shape[0], MAX_ROWS):
                self._block_matmul(x[start : start + MAX_ROWS], out[start:], exact)
        else:
            self._tiled_matmul(x, out, torch.float32 if exact else fast_tile_dtype())
        return out

    def fused_matmul(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        exact: bool,
        op: int = PLAIN,
        norm: tuple[torch.Tensor, float] | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """out (=, or += with `accumulate`) op(x) @ w^T for float32 x, op being PLAIN,
        RMS_NORM (`norm` = its weight and eps) or SILU_MUL (x rows hold [gate | up]): a
        decode step's norm, activation and residual add with the product. Up to MAX_ROWS
        rows it is one C call; larger batches prepare op(x) in C, then multiply in tiles."""
        rows = x.shape[0]
        if rows <= MAX_ROWS:
            self._block_matmul(x, out, exact, op, norm, accumulate)
            return out
        prepared = torch.empty(rows, self.cols, dtype=torch.float32)
        status = self._kernels().prepare(
            x.data_ptr(), x.stride(0), rows, self.cols, op,
            None if norm is None else norm[0].data_ptr(), 0.0 if norm is None else norm[1],
            prepared.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"preparing {tuple(x.shape)} for a matmul failed ({status})")
        if accumulate:
            out += self.matmul(prepared, exact=exact)
        else:
            self.matmul(prepared, out, exact=exact)
        return out

    def _block_matmul(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        exact: bool,
        op: int = PLAIN,
        norm: tuple[torch.Tensor, float] | None = None,
        accumulate: bool = False,
    ) -> None:
        # the per-call Python work is part of every decode step's cost: keep it small
        status = self._kernels().matmul(
            *self._matmul_args,
            x.data_ptr(),
            x.stride(0),
            x.shape[0],
            out.data_ptr(),
            out.stride(0),
            exact,
            op,
            None if norm is None else norm[0].data_ptr(),
            0.0 if norm is None else norm[1],
            accumulate,
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(
                f"{self.qtype.name} matmul of {tuple(x.shape)} by {self.shape} failed ({status})"
            )

    @functools.cached_property
    def _matmul_args(self) -> tuple[int, int, int, int, int]:
        """The kernel's leading arguments: type, weight address, row bytes, rows, cols."""
        data = self.data
        return int(self.qtype), data.ctypes.data, data.shape[1], data.shape[0], self.cols

    def _tiled_matmul(self, x: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> None:
        rows = self.shape[0]
        tile = max(16, TILE_BYTES // (self.cols * dtype.itemsize))
        xt = x.to(dtype)
        for start in range(0, rows, tile):
            stop = min(rows, start + tile)
            w = self.dequantize(start, stop, dtype)
            if dtype == torch.float32:
                torch.mm(xt, w.t(), out=out[:, start:stop])
            else:
                out[:, start:stop] = torch.mm(xt, w.t())
