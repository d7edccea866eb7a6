"""Gated MLP activations over a fused [gate | up] projection: SwiGLU (Llama) and
GeGLU with tanh-GELU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Split the last dimension in half and return silu(first) * second."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Split the last dimension in half and return gelu_tanh(first) * second."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
