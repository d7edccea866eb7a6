"""The quantized small-batch path: GGUF blocks → BlockQuantWeight → C kernel, against float32.

The kernel must give what a float32 matmul over gguf's dequantized weights gives, up to
summation order, for every block type it takes, every batch size it serves, both its
AVX2 and its portable C build; `Linear` must route only small batches to it; and a
model loaded from the default GGUF must carry blocks that dequantize exactly to its
float32 weights.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from pagedllm import cpu_kernels
from pagedllm.model.layers import linear
from pagedllm.model.layers.linear import (
    SMALL_BATCH,
    BlockQuantWeight,
    Linear,
    block_quant_supported,
)

T = GGMLQuantizationType
PORTABLE_FLAGS = ("-O2", "-fopenmp", "-shared", "-fPIC", "-std=c11")  # no -march: no AVX2
TYPES = [T.Q4_0, T.Q4_1, T.Q8_0]

needs_kernels = pytest.mark.skipif(
    linear.block_quant_matmul() is None, reason="no C compiler to build the kernels"
)


def quantized(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0):
    """gguf's bytes for random weights, and gguf's own dequantization of them."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((rows, cols)) * 0.05 + rng.uniform(-0.02, 0.02)).astype(
        np.float32
    )
    raw = gguf_quants.quantize(values, qtype)
    return raw, torch.from_numpy(gguf_quants.dequantize(raw, qtype).reshape(rows, cols).copy())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_blocks_dequantize_exactly_as_gguf_does(qtype):
    raw, reference = quantized(qtype, 12, 96)
    weight = BlockQuantWeight.from_gguf(raw, qtype)
    assert weight.shape == (12, 96)
    assert torch.equal(weight.dequantize(), reference)


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 16])
def test_kernel_matches_float32_matmul(qtype, rows):
    raw, reference = quantized(qtype, 45, 32 * 7, seed=rows)
    weight = BlockQuantWeight.from_gguf(raw, qtype)
    x = torch.randn(rows, 32 * 7)
    expected = x.double() @ reference.double().t()
    got = weight.matmul(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 45)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_refuses_more_rows_than_it_holds():
    raw, _ = quantized(T.Q8_0, 4, 64)
    with pytest.raises(RuntimeError, match="failed"):
        BlockQuantWeight.from_gguf(raw, T.Q8_0).matmul(torch.randn(17, 64))


def test_portable_build_matches_float32_matmul(tmp_path):
    """The C fallback (no AVX2: what an ARM laptop compiles) gives the same products."""
    compiler = cpu_kernels.c_compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    target = tmp_path / "portable.so"
    cpu_kernels.build(compiler, linear.SOURCE, target, PORTABLE_FLAGS)
    kernel = cpu_kernels.declare(ctypes.CDLL(str(target)), "block_quant_matmul", *linear.ARGTYPES)
    for qtype in TYPES:
        raw, reference = quantized(qtype, 9, 64)
        weight = BlockQuantWeight.from_gguf(raw, qtype)
        x = torch.randn(3, 64)
        y = torch.empty(3, 9)
        mins = None if weight.mins is None else weight.mins.data_ptr()
        bits = 8 if weight.kind == "q8" else 4
        status = kernel(
            bits, x.data_ptr(), 3, 64, weight.qs.data_ptr(), weight.scales.data_ptr(), mins, 9,
            y.data_ptr(), 1,
        )  # fmt: skip
        assert status == 0
        torch.testing.assert_close(y, x @ reference.t(), rtol=1e-5, atol=1e-5)


def test_row_maps_and_fused_rows_keep_weights_aligned():
    raw_a, ref_a = quantized(T.Q4_1, 8, 64, seed=1)
    raw_b, ref_b = quantized(T.Q4_0, 4, 64, seed=2)
    a, b = BlockQuantWeight.from_gguf(raw_a, T.Q4_1), BlockQuantWeight.from_gguf(raw_b, T.Q4_0)
    flipped = a.map_rows(lambda rows: rows.flip(0))
    assert torch.equal(flipped.dequantize(), ref_a.flip(0))
    fused = BlockQuantWeight.cat([a, b])
    assert fused is not None
    assert torch.equal(fused.dequantize(), torch.cat([ref_a, ref_b]))
    raw_c, _ = quantized(T.Q8_0, 4, 64)
    assert BlockQuantWeight.cat([a, BlockQuantWeight.from_gguf(raw_c, T.Q8_0)]) is None
    assert BlockQuantWeight.cat([a, None]) is None


@needs_kernels
def test_linear_runs_only_small_batches_on_blocks(monkeypatch):
    raw, reference = quantized(T.Q4_1, 16, 64)
    layer = Linear(64, 16, bias=True)
    with torch.no_grad():
        layer.weight.copy_(reference)
    layer.block_weight = BlockQuantWeight.from_gguf(raw, T.Q4_1)
    calls = []
    original = BlockQuantWeight.matmul
    monkeypatch.setattr(
        BlockQuantWeight, "matmul", lambda self, x: calls.append(len(x)) or original(self, x)
    )
    for rows in (1, SMALL_BATCH, SMALL_BATCH + 1, 64):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(layer(x), F.linear(x, reference, layer.bias))
    assert calls == [1, SMALL_BATCH]


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("PAGEDLLM_DISABLE_KERNELS", "1")
    cpu_kernels.compiled.cache_clear()
    cpu_kernels.kernel.cache_clear()
    try:
        assert linear.block_quant_matmul() is None
        assert not block_quant_supported(torch.float32, torch.device("cpu"))
    finally:
        cpu_kernels.compiled.cache_clear()
        cpu_kernels.kernel.cache_clear()


@needs_kernels
def test_kernels_serve_only_float32_on_the_cpu():
    assert block_quant_supported(torch.float32, torch.device("cpu"))
    assert not block_quant_supported(torch.bfloat16, torch.device("cpu"))
    assert not block_quant_supported(torch.float32, torch.device("meta"))


@needs_kernels
@pytest.mark.slow
def test_default_model_layers_carry_their_file_blocks(model_f32):
    """Every projection and the (tied, Q8_0) LM head of the Q4_1 file gets exact blocks."""
    layers = [m for m in model_f32.modules() if isinstance(m, Linear)]
    assert len(layers) == 4 * model_f32.config.num_layers + 1
    for layer in layers:
        assert layer.block_weight is not None
        assert torch.equal(layer.block_weight.dequantize(), layer.weight)
    assert model_f32.lm_head.block_weight.kind == "q8"
