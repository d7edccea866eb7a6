"""Quantized weights kept as the GGUF file's values, repacked once at load: the only copy.

`QuantizedWeight` holds a quantized matrix as `csrc/quant_matmul.c` repacks it from the
file's blocks (the integers apart from their scales and mins, float16 where exact, so the
hot loops read every type alike; gguf's dequantization is reproduced bit for bit) and
computes from it:
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
# Batches of at most this many rows use the block kernel (one call holds them all); larger
# ones dequantized tiles. Measured crossover, all of SmolLM2-135M's products at 16 rows:
# 39.5 ms for the block kernel, 44.0 ms for bf16 tiles (BENCHMARKS.md,
# `benchmarks/bench_quant_kernels.py`).
SMALL_BATCH = MAX_ROWS
TILE_BYTES = 4 << 20  # one dequantized tile (4 MiB measured best of 1, 4 and whole matrices)

_INT, _LONG, _PTR = ctypes.c_int, ctypes.c_long, ctypes.c_void_p
# quant_matmul(format, half, qs, scales, mins, N, K, x, ldx, M, y, ldy, exact, op,
#              norm_weight, eps, accumulate, num_threads)
MATMUL_ARGS = (_INT, _INT, _PTR, _PTR, _PTR, _INT, _INT, _PTR, _LONG, _INT, _PTR, _LONG, _INT, _INT)
MATMUL_ARGS += (_PTR, ctypes.c_float, _INT, _INT)
# What the kernel does to x first (the C enum) and whether it adds y to the output.
PLAIN, RMS_NORM, SILU_MUL = 0, 1, 2
# dequantize_rows(format, half, qs, scales, mins, K, ids, n, num_rows, out, bf16, num_threads)
DEQUANT_ARGS = (_INT, _INT, _PTR, _PTR, _PTR, _INT, _PTR, _INT, _LONG, _PTR, _INT, _INT)
# repack_rows(type, src, row_bytes, N, K, qs, scales, mins, num_threads)
REPACK_ARGS = (_INT, _PTR, _LONG, _INT, _INT, _PTR, _PTR, _PTR, _INT)
# The layouts of the repack (the C enum), their bytes of integers and scales per block.
U4, U8, I8, I8_HALVES = 0, 1, 2, 3
FORMATS = {T.Q4_0: U4, T.Q4_1: U4, T.Q4_K: U4, T.Q5_0: U8, T.Q5_1: U8, T.Q5_K: U8}
FORMATS |= {T.Q8_0: I8, T.Q6_K: I8_HALVES}
QUANT_BYTES = {U4: 16, U8: 32, I8: 32, I8_HALVES: 32}
SCALES_PER_BLOCK = {U4: 1, U8: 1, I8: 1, I8_HALVES: 2}
WITHOUT_MIN = frozenset({T.Q8_0, T.Q6_K})


# prepare_rows(x, ldx, M, K, op, norm_weight, eps, out, num_threads)
PREPARE_ARGS = (_PTR, _LONG, _INT, _INT, _INT, _PTR, ctypes.c_float, _PTR, _INT)


@dataclass(frozen=True)
class Kernels:
    matmul: Callable[..., int]
    dequantize: Callable[..., int]
    prepare: Callable[..., int]
    repack: Callable[..., int]
    level: str


@functools.cache
def kernels(level: str | None = None) -> Kernels | None:
    """The block kernels built for `level` (default: the best the CPU runs), or None where
    they cannot be built (then weights are dequantized at load instead)."""
    level = level or cpu_kernels.best_level()
    matmul = cpu_kernels.kernel(SOURCE, "quant_matmul", MATMUL_ARGS, level)
    dequant = cpu_kernels.kernel(SOURCE, "dequantize_rows", DEQUANT_ARGS, level)
    prepare = cpu_kernels.kernel(SOURCE, "prepare_rows", PREPARE_ARGS, level)
    repack = cpu_kernels.kernel(SOURCE, "repack_rows", REPACK_ARGS, level)
    if matmul is None or dequant is None or prepare is None or repack is None:
        return None
    return Kernels(matmul, dequant, prepare, repack, level)


def _row_address(array: torch.Tensor, row: int) -> int:
    """Where row `row` of a 2-D array starts (what array[row:].data_ptr() gives, without
    making the view: three of them cost ~5 µs of a batch-1 step's embedding lookup)."""
    return array.data_ptr() + row * array.stride(0) * array.element_size()


def padded_rows(rows: int) -> int:
    """`rows` rounded up to one of four sizes per power of two (16, 32, 48, 64, 80, 96,
    112, 128, 160, ...): at most 25% more rows, and ~24 sizes up to 2,048 rows, so that
    oneDNN's cache holds a kernel for every shape a server meets instead of compiling
    and evicting them as batches change (which grew the heap under load)."""
    step = max(16, 1 << max(0, rows.bit_length() - 3))
    return -(-rows // step) * step


def fast_tile_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (several times float32), else float32."""
    flags = cpu_kernels.cpu_flags()
    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & flags else torch.float32


def _ptr(t: torch.Tensor | np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if isinstance(t, torch.Tensor) else t.ctypes.data)


@dataclass
class QuantizedWeight:
    """A [rows, cols] weight of GGML type `qtype`, repacked: per row, blocks of 32 integers
    (`qs`), a scale per block (two for Q6_K) and a min per block (none for Q8_0 and Q6_K),
    with w = scale * v + min; scales and mins are float16 where that is exact, else float32."""

    qtype: GGMLQuantizationType
    qs: torch.Tensor  # uint8 [rows, blocks * quant bytes]
    scales: torch.Tensor  # float32 or float16 [rows, blocks * scales per block]
    mins: torch.Tensor | None  # float32 or float16 [rows, blocks]
    cols: int
    level: str | None = None  # kernel level; None: the best the CPU runs

    @classmethod
    def from_gguf(
        cls, raw: np.ndarray, qtype: GGMLQuantizationType, level: str | None = None
    ) -> QuantizedWeight:
        """From a GGUF tensor's bytes as gguf's reader gives them: uint8 [rows, bytes per row]."""
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        rows, cols = raw.shape[0], raw.shape[1] // block_bytes * block
        fmt, blocks = FORMATS[qtype], cols // 32
        qs = torch.empty(rows, blocks * QUANT_BYTES[fmt], dtype=torch.uint8)
        scales = torch.empty(rows, blocks * SCALES_PER_BLOCK[fmt], dtype=torch.float32)
        mins = None if qtype in WITHOUT_MIN else torch.empty(rows, blocks, dtype=torch.float32)
        weight = cls(qtype, qs, scales, mins, cols, level)
        raw = np.ascontiguousarray(raw)
        status = weight._kernels().repack(
            int(qtype), _ptr(raw), raw.shape[1], rows, cols, _ptr(qs), _ptr(scales),
            None if mins is None else _ptr(mins), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"{qtype.name} rows of {raw.shape[1]} bytes do not hold {cols} values")
        return weight.in_half_where_exact()

    def in_half_where_exact(self) -> QuantizedWeight:
        """This weight with float16 scales and mins when every one is exactly a float16
        (the legacy types store them so; K-quants multiply two): fewer bytes per token."""
        arrays = [a for a in (self.scales, self.mins) if a is not None]
        if not all(torch.equal(a.half().float(), a) for a in arrays):
            return self
        mins = None if self.mins is None else self.mins.half()
        return QuantizedWeight(self.qtype, self.qs, self.scales.half(), mins, self.cols, self.level)

    @property
    def format(self) -> int:
        return FORMATS[self.qtype]

    @property
    def half(self) -> bool:
        return self.scales.dtype == torch.float16

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.cols

    @property
    def nbytes(self) -> int:
        arrays = (self.qs, self.scales, self.mins)
        return sum(a.numel() * a.element_size() for a in arrays if a is not None)

    def _kernels(self) -> Kernels:
        found = kernels(self.level)
        if found is None:
            raise RuntimeError("the quantized-weight kernels are not built on this machine")
        return found

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedWeight:
        """The same weight with its rows rearranged by `fn` (acting on dim 0)."""
        mins = None if self.mins is None else fn(self.mins).contiguous()
        qs, scales = fn(self.qs).contiguous(), fn(self.scales).contiguous()
        return QuantizedWeight(self.qtype, qs, scales, mins, self.cols, self.level)

    def columns(self, first_block: int, stop_block: int) -> QuantizedWeight:
        """Columns [32 * first_block, 32 * stop_block) of every row (a row-parallel share)."""
        fmt = self.format
        q, s = QUANT_BYTES[fmt], SCALES_PER_BLOCK[fmt]
        mins = None if self.mins is None else self.mins[:, first_block:stop_block].contiguous()
        qs = self.qs[:, first_block * q : stop_block * q].contiguous()
        scales = self.scales[:, first_block * s : stop_block * s].contiguous()
        cols = 32 * (stop_block - first_block)
        return QuantizedWeight(self.qtype, qs, scales, mins, cols, self.level)

    @staticmethod
    def cat(parts: Sequence[QuantizedWeight]) -> QuantizedWeight | None:
        """Rows of several weights stacked (fused QKV, gate/up), or None when they differ in
        layout or width (a Q4_K_M file may store V in Q6_K beside Q/K in Q4_K)."""
        first = parts[0]
        same = all(
            p.format == first.format
            and p.cols == first.cols
            and p.half == first.half
            and (p.mins is None) == (first.mins is None)
            for p in parts
        )
        if not same:
            return None
        mins = None if first.mins is None else torch.cat([p.mins for p in parts])  # type: ignore[misc]
        qs, scales = torch.cat([p.qs for p in parts]), torch.cat([p.scales for p in parts])
        return QuantizedWeight(first.qtype, qs, scales, mins, first.cols, first.level)

    def dequantize(
        self, start: int = 0, stop: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows [start, stop) as `dtype` (float32 equals gguf's dequantization exactly)."""
        stop = self.shape[0] if stop is None else stop
        out = torch.empty(stop - start, self.cols, dtype=dtype)
        self._dequantize(start, None, out)
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 rows `ids` (an embedding lookup); ids must lie in [0, rows)."""
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(*ids.shape, self.cols, dtype=torch.float32)
        self._dequantize(0, ids, out)
        return out

    def _dequantize(self, start: int, ids: torch.Tensor | None, out: torch.Tensor) -> None:
        """Rows start, start + 1, ... (or ids, each checked) into out."""
        qs, scales = _row_address(self.qs, start), _row_address(self.scales, start)
        mins = None if self.mins is None else _row_address(self.mins, start)
        status = self._kernels().dequantize(
            self.format, self.half, qs, scales, mins,
            self.cols, None if ids is None else ids.data_ptr(), out.numel() // self.cols,
            self.shape[0] - start, out.data_ptr(), out.dtype == torch.bfloat16,
            torch.get_num_threads(),
        )  # fmt: skip
        if status == -3:
            raise IndexError(f"row ids out of range [0, {self.shape[0]})")
        if status != 0:
            raise RuntimeError(f"dequantizing {self.qtype.name} rows failed ({status})")

    def matmul(
        self,
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        exact: bool = False,
        op: int = PLAIN,
        norm: tuple[torch.Tensor, float] | None = None,
        accumulate: bool = False,
    ) -> torch.Tensor:
        """out (=, or += with `accumulate`) op(x) @ w^T for float32 x [M, cols], op being
        PLAIN, RMS_NORM (`norm` = its weight and eps) or SILU_MUL (x rows hold [gate | up]):
        a decode step's norm, activation and residual add with the product. `out` may be a
        column slice of a wider float32 tensor (fused layers write their parts in place).
        Up to SMALL_BATCH rows it is one C call; larger batches prepare op(x) in C, then
        multiply in tiles."""
        x = x.contiguous()
        rows = x.shape[0]
        if out is None:
            out = torch.empty(rows, self.shape[0], dtype=torch.float32)
        if rows <= SMALL_BATCH:
            self._block_matmul(x, out, exact, op, norm, accumulate)
            return out
        if op != PLAIN:
            x = self._prepare(x, op, norm)
        tile_dtype = torch.float32 if exact else fast_tile_dtype()
        if accumulate:
            product = torch.empty(rows, self.shape[0], dtype=torch.float32)
            self._tiled_matmul(x, product, tile_dtype)
            out += product
        else:
            self._tiled_matmul(x, out, tile_dtype)
        return out

    def _prepare(
        self, x: torch.Tensor, op: int, norm: tuple[torch.Tensor, float] | None
    ) -> torch.Tensor:
        """op(x) [M, cols] in float32, computed by the C code the block kernel uses."""
        prepared = torch.empty(x.shape[0], self.cols, dtype=torch.float32)
        status = self._kernels().prepare(
            x.data_ptr(), x.stride(0), x.shape[0], self.cols, op,
            None if norm is None else norm[0].data_ptr(), 0.0 if norm is None else norm[1],
            prepared.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"preparing {tuple(x.shape)} for a matmul failed ({status})")
        return prepared

    def _block_matmul(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        exact: bool,
        op: int,
        norm: tuple[torch.Tensor, float] | None,
        accumulate: bool,
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
    def _matmul_args(self) -> tuple[int, bool, int, int, int | None, int, int]:
        """The kernel's leading arguments: layout, scale width, the three arrays, rows, cols."""
        mins = None if self.mins is None else self.mins.data_ptr()
        qs, scales = self.qs.data_ptr(), self.scales.data_ptr()
        return self.format, self.half, qs, scales, mins, self.shape[0], self.cols

    def _tiled_matmul(self, x: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> None:
        rows = self.shape[0]
        tile = max(16, TILE_BYTES // (self.cols * dtype.itemsize))
        xt = x.to(dtype)
        if dtype != torch.float32:
            # oneDNN compiles (and caches) a kernel per shape: rows padded to a few sizes
            # keep the shapes few as the batch changes step by step
            xt = torch.nn.functional.pad(xt, (0, 0, 0, padded_rows(xt.shape[0]) - xt.shape[0]))
        for start in range(0, rows, tile):
            stop = min(rows, start + tile)
            w = self.dequantize(start, stop, dtype)
            if dtype == torch.float32:
                torch.mm(xt, w.t(), out=out[:, start:stop])
            else:
                out[:, start:stop] = torch.mm(xt, w.t())[: x.shape[0]]
