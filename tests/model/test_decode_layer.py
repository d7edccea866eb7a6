"""A decode layer as one C call computes what the same five kernels compute from Python,
bit for bit, in both modes, and writes the same keys and values to the paged cache."""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention import AttentionMetadata
from pagedllm.model.layers import decode_layer
from tests.attention.kv_caches import FORMATS, caches_equal, clone_cache, random_cache

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not decode_layer.available(), reason="no C compiler to build the kernels"),
]

BLOCK = 16


@pytest.mark.parametrize("kv_dtype", ["float32", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int8"])
def test_one_call_layer_equals_the_five_calls(model_f32, exact, kv_dtype):
    model = model_f32
    c = model.config
    layer = model.layers[3]
    lengths = [40, 7, 100]  # each sequence's length after this step's one new token
    tables = [[0, 1, 2], [3], [4, 5, 6, 7, 8, 9, 10]]
    generator = torch.Generator().manual_seed(0)
    kv = random_cache(FORMATS[kv_dtype], 12, BLOCK, c.num_kv_heads, c.head_dim, generator)
    hidden = torch.randn(len(lengths), c.hidden_size, generator=generator)
    meta = AttentionMetadata.build(lengths, [1] * len(lengths), tables, BLOCK)
    cos_sin = model.rotary.cos_sin(meta.positions, torch.float32)

    kv_python, hidden_python = clone_cache(kv), hidden.clone()
    layer.fused_decode(hidden_python, cos_sin, kv_python, meta, exact)
    kv_c, hidden_c = clone_cache(kv), hidden.clone()
    layer.decode_call(kv_c)(hidden_c, decode_layer.DecodeStep(cos_sin, meta), exact)

    assert torch.equal(hidden_c, hidden_python)
    assert caches_equal(kv_c, kv_python)
    assert not caches_equal(kv_c, kv)  # the new keys and values were written
    assert not torch.equal(hidden_c, hidden)  # the layer did something


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int8"])
def test_the_whole_stack_in_one_call_equals_layer_by_layer_then_the_final_norm(model_f32, exact):
    """`decode_stack`: every layer and the model's final norm in one C call, as a batch-1
    decode step runs, equal to the layers one by one followed by `model.norm` (the same
    caches bit for bit, the same outputs to float rounding)."""
    model = model_f32
    c = model.config
    lengths, tables = [33, 5], [[0, 1, 2], [3]]
    generator = torch.Generator().manual_seed(1)
    caches = [
        random_cache(FORMATS["float32"], 4, BLOCK, c.num_kv_heads, c.head_dim, generator)
        for _ in model.layers
    ]
    hidden = torch.randn(len(lengths), c.hidden_size, generator=generator)
    meta = AttentionMetadata.build(lengths, [1] * len(lengths), tables, BLOCK)
    cos_sin = model.rotary.cos_sin(meta.positions, torch.float32)

    caches_python, hidden_python = [clone_cache(kv) for kv in caches], hidden.clone()
    for layer, kv in zip(model.layers, caches_python, strict=True):
        layer.fused_decode(hidden_python, cos_sin, kv, meta, exact)
    expected = model.norm(hidden_python)
    caches_c, hidden_c = [clone_cache(kv) for kv in caches], hidden.clone()
    model.decode_stack(caches_c)(hidden_c, decode_layer.DecodeStep(cos_sin, meta), exact)

    # the layers are the same C code; the final norm is C's, torch's op only to rounding
    torch.testing.assert_close(hidden_c, expected, rtol=1e-5, atol=1e-5)
    assert all(caches_equal(a, b) for a, b in zip(caches_c, caches_python, strict=True))
    model._decode_stack = None  # the session's model keeps no struct of these caches
