"""The test-only K-quant quantizers write bytes that gguf's dequantizers read back within bound."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from tests.model import kquants

K_QUANTS = [
    GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K,
    GGMLQuantizationType.Q4_K,
    GGMLQuantizationType.Q5_K,
    GGMLQuantizationType.Q6_K,
]


def awkward_rows() -> np.ndarray:
    """Super-blocks that exercise the scale edge cases, one row of two super-blocks each."""
    rng = np.random.default_rng(1)
    normal = rng.standard_normal((8, 512))
    rows = [
        normal[0],
        normal[1] * 1e-3 + 5.0,  # all positive, far from zero
        -np.abs(normal[2]) - 0.5,  # all negative
        np.zeros(512),  # zero scales everywhere
        np.full(512, 0.7),  # constant sub-blocks
        normal[5] * 10.0 ** np.repeat(rng.uniform(-4, 1, 32), 16),  # sub-block scales 1e-4..10
        normal[6] ** 3,  # heavy tails
        np.where(np.arange(512) % 97 == 0, 30.0, 0.01 * normal[7]),  # lone spikes
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_kquant_round_trip_within_error_bound(qtype: GGMLQuantizationType) -> None:
    values = awkward_rows()
    packed = kquants.quantize(values, qtype)

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert packed.dtype == np.uint8
    assert packed.shape == (values.shape[0], values.shape[1] // block_size * type_size)
    restored = gguf_quants.dequantize(packed, qtype)
    error = np.abs(restored.astype(np.float64) - values)
    bound = kquants.error_bound(values, qtype)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (
        f"{qtype.name}: error {error[worst]} > bound {bound[worst]} at {worst}"
    )
    assert np.all(restored[3] == 0)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda t: t.name)
def test_kquant_bound_is_tight_enough_to_catch_layout_mistakes(qtype: GGMLQuantizationType) -> None:
    # Shuffling values within a super-block (a wrong byte layout would) must break the bound.
    values = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    restored = gguf_quants.dequantize(kquants.quantize(values, qtype), qtype)
    shuffled = restored.reshape(-1, 256)[:, ::-1].reshape(values.shape)
    assert np.any(np.abs(shuffled - values) > kquants.error_bound(values, qtype))
