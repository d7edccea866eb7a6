"""Rotary position embeddings with the scaling variants Llama-family files use.

Frequencies follow the Hugging Face definitions (default, linear, dynamic NTK, YaRN,
Llama-3), applied in the "rotate half" layout that our weights are in after the GGUF
loader undoes llama.cpp's permutation. cos/sin are tabulated once per position in
float32 and indexed by each token's position, so a flat batch of tokens from many
sequences at different offsets costs one gather.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_frequencies(
    head_dim: int,
    base: float,
    scaling: dict[str, Any] | None,
    max_position_embeddings: int,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale for one scaling type."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return default_inv_freq(head_dim, base), 1.0
    assert scaling is not None
    factor = float(scaling["factor"])
    if not factor > 0:
        raise ValueError(f"factor {factor} is not positive")
    if kind == "linear":
        return default_inv_freq(head_dim, base) / factor, 1.0
    if kind == "dynamic":
        # Static form (as vLLM): the NTK-scaled base for the longest context
        # (factor x original), so cached keys never need re-rotating.
        original = int(scaling.get("original_max_position_embeddings", max_position_embeddings))
        max_len = original * factor
        scaled_base = base * ((factor * max_len / original) - (factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        return default_inv_freq(head_dim, scaled_base), 1.0
    if kind == "yarn":
        return _yarn(head_dim, base, scaling, factor)
    if kind == "llama3":
        return _llama3(head_dim, base, scaling, factor), 1.0
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def _yarn(
    head_dim: int, base: float, scaling: dict[str, Any], factor: float
) -> tuple[torch.Tensor, float]:
    original = int(scaling["original_max_position_embeddings"])
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the original (extrapolated) frequency per dimension
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3(head_dim: int, base: float, scaling: dict[str, Any], factor: float) -> torch.Tensor:
    inv_freq = default_inv_freq(head_dim, base)
    low_factor = float(scaling.get("low_freq_factor", 1.0))
    high_factor = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = original / low_factor, original / high_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_factor) / (high_factor - low_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q and k of a flat batch, indexed by position.

    The angles are computed per step from the step's positions (one float32 product per
    position and frequency, as transformers computes them), not looked up in a table: a
    table sized by the file's context length, which a GGUF may set to 2²⁴, costs
    gigabytes, and a step's T × D/2 angles cost microseconds.
    """

    def __init__(self, head_dim: int, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        self.head_dim = head_dim
        self.attention_scaling = attention_scaling
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        # the frequencies twice over, as the angles' two halves repeat them: a step's
        # angles are then one product, where a cat after it cost two more small ops
        doubled = torch.cat((self.inv_freq, self.inv_freq)).view(1, 1, -1)
        self.register_buffer("inv_freq_doubled", doubled, persistent=False)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The angles' cosines and sines for `positions`, [T, 1, D]: computed once per step
        and shared by every layer."""
        emb = positions.to(torch.float32).view(-1, 1, 1) * self.inv_freq_doubled
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D], positions: [T] → rotated q, k (same dtype)."""
        cos, sin = self.cos_sin(positions, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by the angles whose cos/sin [T, 1, D] `cos_sin` gave."""
    return x * cos + rotate_half(x) * sin
