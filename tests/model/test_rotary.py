"""Rotary frequencies equal transformers' for every scaling type we support."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedllm.model.layers.rotary import RotaryEmbedding, rope_frequencies, rotate_half

SCALINGS = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 16,
        "beta_slow": 2,
        "attention_factor": 1.2,
    },
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_scaled_frequencies_match_transformers(scaling):
    head_dim, base, max_pos = 64, 500000.0, 8192 * 4
    config = LlamaConfig(
        hidden_size=head_dim * 8,
        num_attention_heads=8,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": base, **scaling},
    )
    expected, expected_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    ours, scale = rope_frequencies(head_dim, base, scaling, max_pos)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(expected_scale)


def test_default_frequencies_and_unknown_type():
    ours, scale = rope_frequencies(64, 10000.0, None, 2048)
    assert scale == 1.0 and ours[0] == 1.0 and ours.shape == (32,)
    with pytest.raises(ValueError, match="unsupported rope scaling type 'longrope'"):
        rope_frequencies(64, 10000.0, {"rope_type": "longrope", "factor": 2.0}, 2048)


def test_dynamic_ntk_raises_the_base():
    plain, _ = rope_frequencies(64, 10000.0, None, 2048)
    scaled, _ = rope_frequencies(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 2048)
    assert scaled[0] == plain[0] and (scaled[1:] < plain[1:]).all()


def test_rotation_preserves_norm_and_relative_angle():
    inv_freq, _ = rope_frequencies(16, 10000.0, None, 64)
    rope = RotaryEmbedding(16, inv_freq)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    dots = []
    for shift in (0, 7):
        pos_q, pos_k = torch.tensor([10 + shift]), torch.tensor([3 + shift])
        rq, _ = rope(pos_q, q, k)
        _, rk = rope(pos_k, q, k)
        dots.append((rq * rk).sum())
        torch.testing.assert_close(rq.norm(), q.norm())
    torch.testing.assert_close(dots[0], dots[1], rtol=1e-4, atol=1e-4)
    assert torch.equal(
        rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0])
    )


@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1)])
def test_rotation_in_c_gives_torchs_values_bit_for_bit(tokens, heads):
    """The C rotation of a prefill's q and k (`rotate_qk`) is the same float operations
    as `apply_rotary`: equal values, not close ones, so the exact path stays exact."""
    from pagedllm.attention import cpu_decode
    from pagedllm.model.layers.rotary import apply_rotary

    if cpu_decode.rotate_qk_kernel() is None:
        pytest.skip("no C compiler")
    num_heads, num_kv_heads = heads
    head_dim = 64
    generator = torch.Generator().manual_seed(tokens)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(tokens, width, generator=generator) * 3
    rotary = RotaryEmbedding(head_dim, 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    positions = torch.randint(0, 100_000, (tokens,), generator=generator)
    cos_sin = rotary.cos_sin(positions, torch.float32)
    q, k = cpu_decode.rotate_qk(qkv, cos_sin, num_heads, num_kv_heads, head_dim)
    qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(tokens, -1, head_dim)
    expected_q, expected_k = apply_rotary(qk, *cos_sin).split([num_heads, num_kv_heads], dim=1)
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
