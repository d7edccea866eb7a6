"""RMSNorm: a decode step's few rows normed in C give torch's values to float rounding,
and anything else (more rows, 3-D heads, other dtypes) stays with torch's op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedllm.model.layers import quantized
from pagedllm.model.layers.rms_norm import RMSNorm


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 300])
def test_rms_norm_matches_torch_on_small_and_large_batches(rows):
    generator = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.rand(576, generator=generator) + 0.5
    x = torch.randn(rows, 576, generator=generator) * 4
    expected = F.rms_norm(x, (576,), norm.weight, 1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=2e-6, atol=2e-6)
    heads = x.view(rows, 9, 64)  # q/k norms per head: torch's op
    head_norm = RMSNorm(64, 1e-6)
    torch.testing.assert_close(head_norm(heads), F.rms_norm(heads, (64,), head_norm.weight, 1e-6))


def test_small_batches_are_normed_by_the_c_kernel(monkeypatch):
    """The C path is taken where it pays (it is what a batch-1 step runs)."""
    if quantized.kernels() is None:
        pytest.skip("no C compiler")
    calls = []
    original = quantized.kernels()

    def counting_prepare(*args):
        calls.append(args[2])  # rows
        return original.prepare(*args)

    patched = quantized.Kernels(
        original.matmul, original.dequantize, counting_prepare, original.repack, original.level
    )
    monkeypatch.setattr(quantized, "kernels", lambda level=None: patched)
    norm = RMSNorm(64, 1e-5)
    norm(torch.randn(3, 64))
    norm(torch.randn(quantized.SMALL_BATCH + 1, 64))
    assert calls == [3]
