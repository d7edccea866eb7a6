"""Linear layers that can run small batches straight on a GGUF file's quantized blocks.

A decode step over a few sequences is bound by reading the weights, not by arithmetic:
float32 weights cost 4 bytes each, the file's Q4 blocks 0.5 (plus scales). `Linear` keeps
the float32 weight for large batches (prefill, many sequences: there torch's matmul is
faster) and, when the file's blocks are attached, runs batches of at most
`SMALL_BATCH` rows through the C kernels in `csrc/`, which multiply in float32 and so
agree with the float32 matmul up to summation order.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from pagedllm import cpu_kernels

SOURCE = Path(__file__).resolve().parent / "csrc" / "block_quant_matmul.c"
QK = 32  # elements per block in every type handled here
# Batches up to this many rows take the quantized path: measured crossover on the 2-core
# AVX2 CPU (SmolLM2-135M layers): 2.3x at 1 row, 3.3x at 4, 1.4x at 8, ~1.3x at 16.
SMALL_BATCH = 8

# GGUF block layouts: (bytes per block, offset of the quants, has a min)
_LAYOUTS = {
    GGMLQuantizationType.Q4_0: (18, 2, False),
    GGMLQuantizationType.Q4_1: (20, 4, True),
    GGMLQuantizationType.Q8_0: (34, 2, False),
}
BLOCK_QUANT_TYPES = frozenset(_LAYOUTS)


_INT, _PTR = ctypes.c_int, ctypes.c_void_p
# block_quant_matmul(bits, x, M, K, q, scales, mins, N, y, num_threads)
ARGTYPES = (_INT, _PTR, _INT, _INT, _PTR, _PTR, _PTR, _INT, _PTR, _INT)


def block_quant_matmul() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The C kernel, or None where it cannot be built."""
    return cpu_kernels.kernel(SOURCE, "block_quant_matmul", ARGTYPES)


@dataclass
class BlockQuantWeight:
    """A [N, K] weight as 32-column blocks: w[n, 32b + j] = scales[n, b] * q[n, b, j] + mins[n, b].

    `qs` holds the quants as the file stores them (Q4: two per byte, element j in the low
    nibble and j + 16 in the high one; Q8: one signed byte each); the fp16 scales of the
    file are widened to float32 once, here.
    """

    kind: Literal["q4", "q8"]
    qs: torch.Tensor  # uint8 [N, K/32 * bytes per block of quants]
    scales: torch.Tensor  # float32 [N, K/32]
    mins: torch.Tensor | None  # float32 [N, K/32], None when zero

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * QK

    @classmethod
    def from_gguf(cls, raw: np.ndarray, qtype: GGMLQuantizationType) -> BlockQuantWeight:
        """From a GGUF tensor's bytes, [rows, bytes per row], of a type in BLOCK_QUANT_TYPES."""
        block_bytes, quant_offset, has_min = _LAYOUTS[qtype]
        rows = raw.shape[0]
        blocks = np.ascontiguousarray(raw).reshape(rows, -1, block_bytes)
        scales = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = np.ascontiguousarray(blocks[:, :, quant_offset:]).reshape(rows, -1)
        mins = None
        if has_min:
            mins = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        elif qtype == GGMLQuantizationType.Q4_0:  # w = d * (q - 8)
            mins = -8.0 * scales
        kind: Literal["q4", "q8"] = "q8" if qtype == GGMLQuantizationType.Q8_0 else "q4"
        return cls(
            kind,
            torch.from_numpy(qs),
            torch.from_numpy(np.ascontiguousarray(scales)),
            None if mins is None else torch.from_numpy(np.ascontiguousarray(mins)),
        )

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockQuantWeight:
        """The same weight with its rows rearranged by `fn` (which acts on dim 0)."""
        mins = None if self.mins is None else fn(self.mins).contiguous()
        return BlockQuantWeight(
            self.kind, fn(self.qs).contiguous(), fn(self.scales).contiguous(), mins
        )

    @staticmethod
    def cat(parts: Sequence[BlockQuantWeight | None]) -> BlockQuantWeight | None:
        """Rows of several weights stacked (fused QKV, gate/up), or None if they differ in kind."""
        if any(p is None for p in parts) or len({p.kind for p in parts}) != 1:  # type: ignore[union-attr]
            return None
        kept: list[BlockQuantWeight] = list(parts)  # type: ignore[arg-type]
        mins = None
        if any(p.mins is not None for p in kept):
            mins = torch.cat(
                [torch.zeros_like(p.scales) if p.mins is None else p.mins for p in kept]
            )
        return BlockQuantWeight(
            kept[0].kind,
            torch.cat([p.qs for p in kept]),
            torch.cat([p.scales for p in kept]),
            mins,
        )

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] (what gguf's dequantization gives, for checks)."""
        n, k = self.shape
        if self.kind == "q4":
            packed = self.qs.view(n, k // QK, QK // 2)
            q = torch.cat([packed & 15, packed >> 4], dim=-1).float()
        else:
            q = self.qs.view(torch.int8).view(n, k // QK, QK).float()
        w = q * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(n, k)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 (M <= SMALL_BATCH) @ w^T → [M, N], through the C kernel."""
        kernel = block_quant_matmul()
        assert kernel is not None, "attach block weights only where the kernel builds"
        x = x.contiguous()
        rows, k = x.shape
        n = self.scales.shape[0]
        y = torch.empty(rows, n, dtype=torch.float32)
        status = kernel(
            4 if self.kind == "q4" else 8,
            ctypes.c_void_p(x.data_ptr()),
            rows,
            k,
            ctypes.c_void_p(self.qs.data_ptr()),
            ctypes.c_void_p(self.scales.data_ptr()),
            None if self.mins is None else ctypes.c_void_p(self.mins.data_ptr()),
            n,
            ctypes.c_void_p(y.data_ptr()),
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"block-quantized matmul of {tuple(x.shape)} failed ({status})")
        return y


def block_quant_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `Linear` can use quantized blocks for a model of this dtype on this device."""
    return dtype == torch.float32 and device.type == "cpu" and block_quant_matmul() is not None


class Linear(nn.Linear):
    """nn.Linear whose small batches run on `block_weight` (the file's blocks) when set."""

    block_weight: BlockQuantWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = self.block_weight
        if block is not None and x.dim() == 2 and x.shape[0] <= SMALL_BATCH:
            y = block.matmul(x)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)
