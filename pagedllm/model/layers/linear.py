"""Linear layers over dense weights or a GGUF file's quantized blocks.

A layer holds one dense weight (F32/F16/BF16 tensors, safetensors checkpoints, or any
weight off the CPU) or, on the CPU, the file's blocks as its only copy (`QuantizedWeight`).
A fused layer (QKV, gate/up) whose parts were stored in different types keeps them as
parts and writes each into its columns of the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.model.layers.quantized import QuantizedWeight

WeightPart = torch.Tensor | QuantizedWeight


def merge_parts(parts: Sequence[WeightPart]) -> list[WeightPart]:
    """Adjacent parts joined where they can be (same quantized type, or dense tensors)."""
    merged: list[WeightPart] = []
    for part in parts:
        last = merged[-1] if merged else None
        if isinstance(part, QuantizedWeight) and isinstance(last, QuantizedWeight):
            joined = QuantizedWeight.cat([last, part])
            if joined is not None:
                merged[-1] = joined
                continue
        dense_pair = isinstance(part, torch.Tensor) and isinstance(last, torch.Tensor)
        if dense_pair and last.dtype == part.dtype:  # type: ignore[union-attr]
            merged[-1] = torch.cat([last, part])  # type: ignore[list-item]
            continue
        merged.append(part)
    return merged


class Linear(nn.Module):
    """y = x W^T (+ b). W is dense (`weight`) or quantized parts (`quantized_parts`).

    `exact` makes quantized parts compute in float32 from the exact dequantized values
    (matching transformers); otherwise small batches quantize x to int8 per block.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.quantized_parts: list[WeightPart] = []
        self.exact = False

    def load(
        self,
        parts: Sequence[WeightPart],
        bias: torch.Tensor | None,
        device: torch.device,
        exact: bool = False,
    ) -> None:
        """Take the weight as the rows of `parts` stacked (dense parts stay in their dtype)."""
        merged = merge_parts(parts)
        self.exact = exact
        if len(merged) == 1 and isinstance(merged[0], torch.Tensor):
            self.weight = nn.Parameter(merged[0].to(device), requires_grad=False)
            self.quantized_parts = []
        else:
            self.weight = None
            self.quantized_parts = merged
        if bias is not None:
            self.bias = nn.Parameter(bias.to(device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            w = self.weight
            bias = None if self.bias is None else self.bias.to(w.dtype)
            return F.linear(x.to(w.dtype), w, bias).to(x.dtype)
        parts = self.quantized_parts
        if len(parts) == 1 and self.bias is None and x.dtype == torch.float32:  # decode's path
            if x.dim() == 2:  # rows as they are: no reshape or view (a batch-1 LM head's)
                return parts[0].matmul(x, exact=self.exact)
            shape = x.shape
            return parts[0].matmul(x.reshape(-1, shape[-1]), exact=self.exact).view(*shape[:-1], -1)
        shape = x.shape
        x32 = x.reshape(-1, shape[-1]).float()
        y = torch.empty(x32.shape[0], self.out_features, dtype=torch.float32)
        col = 0
        for part in self.quantized_parts:
            width = part.shape[0]
            if isinstance(part, QuantizedWeight):
                part.matmul(x32, y[:, col : col + width], exact=self.exact)
            else:
                y[:, col : col + width] = F.linear(x32.to(part.dtype), part).float()
            col += width
        if self.bias is not None:
            y += self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class Embedding(nn.Module):
    """Token embeddings from a dense table or, row by row, from the file's blocks."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight: nn.Parameter | None = nn.Parameter(torch.empty(num_embeddings, dim))
        self.quantized: QuantizedWeight | None = None
        self.dtype = torch.float32

    def load(self, table: WeightPart, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype = dtype
        if isinstance(table, QuantizedWeight):
            self.weight, self.quantized = None, table
        else:
            self.weight, self.quantized = nn.Parameter(table.to(device), requires_grad=False), None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.rows(ids).to(self.dtype)
        assert self.weight is not None
        return F.embedding(ids, self.weight).to(self.dtype)
