"""SwiGLU's gate: silu(gate) * up over a fused [gate | up] projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Split the last dimension in half and return silu(first) * second."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
