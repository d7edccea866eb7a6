"""Quantizers for ggml's K-quants (Q2_K … Q6_K), so tests can write real K-quant GGUF files.

The `gguf` package only dequantizes K-quants. These functions produce ggml's block bytes
(super-blocks of 256 values, layouts as in `gguf.quants.*.dequantize_blocks`), but make no
attempt at llama.cpp's quality: there is no scale search. Instead every scale is rounded
*up*, so each sub-block's quantization grid always covers the sub-block's values and
nothing is clipped. That gives a simple guarantee, `error_bound`, which tests check.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

QK_K = 256  # values per super-block

T = GGMLQuantizationType


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Float values [..., n·256] → uint8 bytes [..., n·type_size] in ggml's layout for `qtype`."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[-1] % QK_K:
        raise ValueError(f"rows of {values.shape[-1]} values are not whole {QK_K}-value blocks")
    blocks = values.reshape(-1, QK_K)
    packed = _QUANTIZERS[qtype](blocks)
    return packed.reshape(*values.shape[:-1], -1)


# How each type quantizes a sub-block:
#   affine:    x ≈ d·sc·q − dmin·m   with q ∈ [0, q_max],     sc, m ∈ [0, scale_max]
#   symmetric: x ≈ d·sc·q            with q ∈ [−q_max−1, q_max], |sc| ≤ scale_max
# (sub-block size, q_max, scale_max)
AFFINE = {T.Q2_K: (16, 3, 15), T.Q4_K: (32, 15, 63), T.Q5_K: (32, 31, 63)}
SYMMETRIC = {T.Q3_K: (16, 3, 31), T.Q6_K: (16, 31, 127)}


def error_bound(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The most each value may move through `quantize` then dequantization, per value.

    Both kinds round sub-block scales up onto a grid of unit d (float16, rounded up, so
    d ≤ largest needed step / scale_max · (1 + 2⁻¹⁰)), so a sub-block's step is at most
    its needed step plus d and, with nothing clipped, the error is at most half that.

    affine: the needed step is (hi + dmin·m) / q_max with dmin·m < −min(lo, 0) + dmin, so
      error < ½·r/q_max + ½·dmin/q_max + ½·d, where r = hi − min(lo, 0) ≤ 2A and
      dmin ≤ A/scale_max·(1 + 2⁻¹⁰), A the super-block's largest |x|. The last two terms
      sum to below A/(q_max·scale_max)·(½ + 1 + ½/scale_max)·(1 + 2⁻¹⁰) ≤ 1.6·A/(q_max·scale_max).
    symmetric: the needed step is ≤ a/q_max (a the sub-block's largest |x|), so
      error ≤ ½·a/q_max + ½·A/(q_max·scale_max)·(1 + 2⁻¹⁰) ≤ ½·a/q_max + 0.51·A/(q_max·scale_max).
    """
    values = np.asarray(values, dtype=np.float64)
    shape = values.shape
    if qtype in AFFINE:
        sub, q_max, scale_max = AFFINE[qtype]
        x = values.reshape(-1, QK_K // sub, sub)
        r = x.max(-1, keepdims=True) - np.minimum(x.min(-1, keepdims=True), 0)
        bound = 0.5 * r / q_max + 1.6 * _super_block_absmax(x) / (q_max * scale_max)
    else:
        sub, q_max, scale_max = SYMMETRIC[qtype]
        x = values.reshape(-1, QK_K // sub, sub)
        a = np.abs(x).max(-1, keepdims=True)
        bound = 0.5 * a / q_max + 0.51 * _super_block_absmax(x) / (q_max * scale_max)
    return np.broadcast_to(bound, x.shape).reshape(shape)


def _super_block_absmax(x: np.ndarray) -> np.ndarray:
    return np.abs(x).max(axis=(1, 2), keepdims=True)


def _f16_at_least(x: np.ndarray) -> np.ndarray:
    """x as float16, one ulp higher where plain rounding went below x."""
    h = x.astype(np.float16)
    return np.where(h.astype(np.float64) < x, np.nextafter(h, np.float16(np.inf)), h)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, and 0 where b is 0 (an all-zero sub-block has a zero scale)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return np.divide(a, b, out=np.zeros(a.shape), where=b != 0)


def _affine(blocks: np.ndarray, qtype: GGMLQuantizationType):
    """d, dmin [n, 1] (float16); sc, m [n, subs]; q [n, 256] for x ≈ d·sc·q − dmin·m."""
    sub, q_max, scale_max = AFFINE[qtype]
    x = blocks.reshape(len(blocks), -1, sub)
    # m is unsigned and subtracted: a sub-block's offset can only move its grid down to 0 or below.
    below_zero = -np.minimum(x.min(-1), 0)
    dmin = _f16_at_least(below_zero.max(-1, keepdims=True) / scale_max)
    m = np.minimum(np.ceil(_ratio(below_zero, dmin)), scale_max)  # dmin·m ≥ below_zero
    offset = dmin * m
    step = (x.max(-1) + offset) / q_max  # smallest step whose grid reaches the highest value
    d = _f16_at_least(step.max(-1, keepdims=True) / scale_max)
    sc = np.minimum(np.ceil(_ratio(step, d)), scale_max)
    q = np.rint(_ratio(x + offset[..., None], (d * sc)[..., None]))
    return d, dmin, sc, m, np.clip(q, 0, q_max).reshape(len(blocks), QK_K)


def _symmetric(blocks: np.ndarray, qtype: GGMLQuantizationType):
    """d [n, 1] (float16); sc [n, subs] (signed); q [n, 256] for x ≈ d·sc·q.

    The grid has one more level below zero than above; a negative scale turns it round
    when a sub-block's largest magnitude is positive, and the step is chosen so both
    ends are covered.
    """
    sub, q_max, scale_max = SYMMETRIC[qtype]
    x = blocks.reshape(len(blocks), -1, sub)
    above = np.maximum(x.max(-1), 0)
    below = np.maximum(-x.min(-1), 0)
    big, small = np.maximum(above, below), np.minimum(above, below)
    step = np.maximum(big / (q_max + 1), small / q_max)
    sign = np.where(above > below, -1.0, 1.0)
    d = _f16_at_least(step.max(-1, keepdims=True) / scale_max)
    sc = sign * np.minimum(np.ceil(_ratio(step, d)), scale_max)
    q = np.rint(_ratio(x, (d * sc)[..., None]))
    return d, sc, np.clip(q, -q_max - 1, q_max).reshape(len(blocks), QK_K)


def _pack(fields: np.ndarray, bits: int, run: int) -> np.ndarray:
    """Pack `bits`-wide fields as ggml does: 8 // bits consecutive runs of `run` values share
    one run of `run` bytes, the k-th run in bits k·bits and up."""
    per_byte = 8 // bits
    fields = fields.astype(np.uint8).reshape(len(fields), -1, per_byte, run)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).reshape(1, 1, per_byte, 1)
    return np.bitwise_or.reduce(fields << shifts, axis=2).reshape(len(fields), -1)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8)


def _pack_q4k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins in 12 bytes: the low 6 bits of the first four of each in
    bytes 0-7, the last four's low nibbles in bytes 8-11 and their top 2 bits in the
    first eight bytes' top 2 bits."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate(
        [
            sc[:, :4] | (sc[:, 4:] >> 4) << 6,
            m[:, :4] | (m[:, 4:] >> 4) << 6,
            (sc[:, 4:] & 0xF) | (m[:, 4:] & 0xF) << 4,
        ],
        axis=1,
    )


def _quantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, T.Q2_K)
    scales = sc.astype(np.uint8) | m.astype(np.uint8) << 4
    return np.concatenate([scales, _pack(q, 2, 32), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _quantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    d, sc, q = _symmetric(blocks, T.Q3_K)
    u = (q + 4).astype(np.uint8)  # 0..7; ggml reads a clear high bit as −4
    stored = (sc + 32).astype(np.uint8)  # 6-bit scales, offset by 32
    scales = np.concatenate([_pack(stored & 0xF, 4, 8), _pack(stored >> 4, 2, 4)], axis=1)
    return np.concatenate(
        [_pack(u >> 2, 1, 32), _pack(u & 3, 2, 32), scales, _f16_bytes(d)], axis=1
    )


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, T.Q4_K)
    return np.concatenate(
        [_f16_bytes(d), _f16_bytes(dmin), _pack_q4k_scales(sc, m), _pack(q, 4, 32)], axis=1
    )


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, T.Q5_K)
    q = q.astype(np.uint8)
    return np.concatenate(
        [
            _f16_bytes(d),
            _f16_bytes(dmin),
            _pack_q4k_scales(sc, m),
            _pack(q >> 4, 1, 32),
            _pack(q & 0xF, 4, 32),
        ],
        axis=1,
    )


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    d, sc, q = _symmetric(blocks, T.Q6_K)
    u = (q + 32).astype(np.uint8)  # 0..63
    scales = sc.astype(np.int8).view(np.uint8)
    return np.concatenate(
        [_pack(u & 0xF, 4, 64), _pack(u >> 4, 2, 32), scales, _f16_bytes(d)], axis=1
    )


_QUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    T.Q2_K: _quantize_q2_k,
    T.Q3_K: _quantize_q3_k,
    T.Q4_K: _quantize_q4_k,
    T.Q5_K: _quantize_q5_k,
    T.Q6_K: _quantize_q6_k,
}
