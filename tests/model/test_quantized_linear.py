"""Quantized weights computed from the file's blocks, against gguf's dequantization.

Every type × every kernel level this CPU runs (portable C included) × batch sizes on both
sides of the small-batch threshold: the exact mode must equal a float32 matmul over the
dequantized weights up to summation order; the integer mode must stay inside the error
that int8 activations (round to nearest, d = max|x| / 127 per 16 values) can cause.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from pagedllm import cpu_kernels
from pagedllm.model.layers import quantized as q
from pagedllm.model.layers.linear import Embedding, Linear
from pagedllm.model.layers.quantized import QUANT_TYPES, QuantizedWeight
from tests.model import kquants

T = GGMLQuantizationType
K_QUANTS = {T.Q4_K, T.Q5_K, T.Q6_K}
LEVELS = cpu_kernels.supported_levels()
TYPES = sorted(QUANT_TYPES)

pytestmark = pytest.mark.skipif(q.kernels() is None, reason="no C compiler to build the kernels")


def quantized(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0):
    """The file's bytes for random weights, and gguf's own dequantization of them."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((rows, cols)) * 0.05 + rng.uniform(-0.02, 0.02)).astype(
        np.float32
    )
    quantize = kquants.quantize if qtype in K_QUANTS else gguf_quants.quantize
    raw = quantize(values, qtype)
    reference = gguf_quants.dequantize(raw, qtype).reshape(rows, cols).copy()
    return raw, torch.from_numpy(reference)


def width(qtype: GGMLQuantizationType) -> int:
    """K: super-blocks for K-quants; not a multiple of 256 for the 32-value types."""
    return 512 if qtype in K_QUANTS else 32 * 11


def int8_activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The most int8 activations can move x @ w^T: each x is off by at most max|x| / 254
    over its 16 values (the kernel's scale), times |w| summed over them (plus float32
    rounding)."""
    xh = x.double().reshape(x.shape[0], -1, 16)
    step = xh.abs().amax(-1) / 254  # [M, halves]
    wabs = w.double().abs().reshape(w.shape[0], -1, 16).sum(-1)  # [N, halves]
    return step @ wabs.t() + 1e-5


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_and_row_lookup_equal_gguf(level, qtype):
    raw, reference = quantized(qtype, 21, width(qtype))
    weight = QuantizedWeight.from_gguf(raw, qtype, level)
    assert weight.shape == tuple(reference.shape)
    assert torch.equal(weight.dequantize(), reference)
    assert torch.equal(weight.dequantize(5, 9), reference[5:9])
    assert torch.equal(weight.dequantize(dtype=torch.bfloat16), reference.bfloat16())
    ids = torch.tensor([[3, 0], [20, 3]])
    assert torch.equal(weight.rows(ids), reference[ids])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 7, 16, 64, 300])
def test_matmul_matches_dequantized_float32(level, qtype, rows):
    cols = width(qtype)
    raw, reference = quantized(qtype, 45, cols, seed=rows)
    weight = QuantizedWeight.from_gguf(raw, qtype, level)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))
    expected = x.double() @ reference.double().t()

    exact = weight.matmul(x, exact=True)
    assert exact.dtype == torch.float32 and exact.shape == (rows, 45)
    torch.testing.assert_close(exact.double(), expected, rtol=1e-5, atol=1e-5)

    fast = weight.matmul(x).double()
    if rows <= q.SMALL_BATCH:  # int8 activations
        assert ((fast - expected).abs() <= int8_activation_bound(x, reference)).all()
    else:  # tiles in bfloat16 (or float32 where the CPU lacks bf16 units)
        scale = (x.double().abs() @ reference.double().abs().t()) * 2**-7 + 1e-5
        assert ((fast - expected).abs() <= scale).all()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_every_level_computes_the_same_integer_sums(qtype):
    """The levels differ only in instructions: their int8 products agree to rounding."""
    cols = width(qtype)
    raw, _ = quantized(qtype, 33, cols, seed=3)
    x = torch.randn(5, cols)
    results = [QuantizedWeight.from_gguf(raw, qtype, level).matmul(x) for level in LEVELS]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-5, atol=1e-5)


def test_rows_that_do_not_hold_whole_blocks_are_refused():
    raw, _ = quantized(T.Q8_0, 4, 64)
    with pytest.raises(ValueError, match="do not hold"):
        QuantizedWeight.from_gguf(raw[:, :-1], T.Q8_0)
    weight = QuantizedWeight.from_gguf(raw, T.Q8_0)
    for ids in ([4], [0, 4], [-1], [1, 2, -5]):  # checked in C, before any row is written
        with pytest.raises(IndexError):
            weight.rows(torch.tensor(ids))


def test_repacked_legacy_types_take_the_files_bytes_and_k_quants_float32_scales():
    """Q4_1 keeps its float16 scale and min (exact): 16 bytes of nibbles + 4, as the file.
    A Q4_K scale is a float16 times a 6-bit integer, not a float16: float32, 24 bytes a
    block of 32 against the file's 18."""
    raw, _ = quantized(T.Q4_1, 8, 256)
    weight = QuantizedWeight.from_gguf(raw, T.Q4_1)
    assert weight.half and weight.nbytes == raw.nbytes == 8 * 8 * 20
    raw_k, _ = quantized(T.Q4_K, 8, 256)
    weight_k = QuantizedWeight.from_gguf(raw_k, T.Q4_K)
    assert not weight_k.half and weight_k.nbytes == 8 * 8 * 24 and raw_k.nbytes == 8 * 8 * 18


def test_fused_layer_keeps_parts_of_different_types_and_writes_each_in_place():
    """A Q4_K_M file stores V in Q6_K beside Q/K in Q4_K: the fused QKV keeps two parts."""
    raw_q, ref_q = quantized(T.Q4_K, 8, 256, seed=1)
    raw_k, ref_k = quantized(T.Q4_K, 4, 256, seed=2)
    raw_v, ref_v = quantized(T.Q6_K, 4, 256, seed=3)
    dense = torch.randn(3, 256)
    layer = Linear(256, 19)
    parts = [QuantizedWeight.from_gguf(r, t) for r, t in ((raw_q, T.Q4_K), (raw_k, T.Q4_K))]
    parts.append(QuantizedWeight.from_gguf(raw_v, T.Q6_K))
    layer.load([*parts, dense], torch.arange(19.0), torch.device("cpu"), exact=True)
    assert layer.weight is None and len(layer.quantized_parts) == 3  # Q4_K merged, Q6_K, dense
    x = torch.randn(2, 256)
    full = torch.cat([ref_q, ref_k, ref_v, dense])
    torch.testing.assert_close(layer(x), x @ full.t() + torch.arange(19.0), rtol=1e-5, atol=1e-5)


def test_embedding_reads_rows_from_blocks():
    raw, reference = quantized(T.Q8_0, 10, 64)
    table = Embedding(10, 64)
    table.load(QuantizedWeight.from_gguf(raw, T.Q8_0), torch.bfloat16, torch.device("cpu"))
    out = table(torch.tensor([9, 1]))
    assert out.dtype == torch.bfloat16 and table.weight is None
    assert torch.equal(out, reference[[9, 1]].bfloat16())


@pytest.mark.slow
def test_default_model_keeps_only_its_quantized_values(default_model_path):
    from pagedllm.model.loader import load_model

    model = load_model(default_model_path, torch.float32)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None for m in linears)
    assert model.embed_tokens.weight is None
    assert model.lm_head.quantized_parts[0] is model.embed_tokens.quantized  # tied, one copy
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert dense_bytes < 1_000_000  # the norms only
    block_bytes = sum(
        p.nbytes for m in linears for p in m.quantized_parts if m is not model.lm_head
    )
    weights = block_bytes + model.embed_tokens.quantized.nbytes
    assert weights < default_model_path.stat().st_size  # Q4_1 and Q8_0 keep their bytes


def test_loader_names_the_file_and_tensor_when_rows_do_not_hold_whole_blocks(tmp_path):
    """A quantized tensor whose rows are not whole blocks is a ModelLoadError, not a crash."""
    from types import SimpleNamespace

    from pagedllm.model.loader.errors import ModelLoadError
    from pagedllm.model.loader.gguf import _tensor_value

    raw, _ = quantized(T.Q8_0, 4, 64)
    tensor = SimpleNamespace(
        name="blk.0.ffn_up.weight", tensor_type=T.Q8_0, shape=raw.shape, data=raw[:, :-1]
    )
    with pytest.raises(ModelLoadError, match=r"bad\.gguf.*blk\.0\.ffn_up\.weight"):
        _tensor_value(
            tmp_path / "bad.gguf",
            tensor,
            "model.layers.0.mlp.up_proj.weight",
            torch.float32,
            quantized=True,
        )


def test_bf16_tiles_see_few_row_counts_and_little_padding():
    from pagedllm.model.layers.quantized import padded_rows

    sizes = {padded_rows(rows) for rows in range(1, 2049)}
    assert len(sizes) <= 24  # oneDNN caches a kernel per shape: 24 row counts × ~6 shapes
    assert all(padded_rows(rows) >= rows for rows in range(1, 4097))
    assert all(padded_rows(rows) % 16 == 0 for rows in range(1, 4097))
    assert max(padded_rows(rows) / rows for rows in range(64, 4097)) <= 1.25
