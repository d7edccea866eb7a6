"""The KV-cache object: each storage format keeps its values within the format's error,
the C kernels write the same bits as torch, and copies carry the scales."""

from __future__ import annotations

import ctypes

import pytest
import torch

from pagedllm import cpu_kernels
from pagedllm.attention import cpu_decode
from pagedllm.attention.kv_cache import KV_CACHE_DTYPES as DTYPE_OF_NAME
from pagedllm.attention.kv_cache import (
    Fp8KVCache,
    Int8KVCache,
    KVCache,
    make_kv_cache,
    resolve_kv_cache_dtype,
)
from pagedllm.config import KV_CACHE_DTYPES
from tests.attention.kv_caches import FORMATS, caches_equal, clone_cache, random_cache

# Largest error of one stored value, relative to the value (floats) or to its (token,
# head)'s largest magnitude (int8: half a step of 127), for values in the normal range.
RELATIVE_ERROR = {
    "float32": 0.0,
    "bfloat16": 2**-8,
    "float16": 2**-11,
    "int8": 0.5 / 127 * (1 + 2**-10),  # half a step of the float16-rounded scale
    "fp8_e4m3": 2**-4,
    "fp8_e5m2": 2**-3,
}


def _values(generator: torch.Generator, tokens: int = 40) -> torch.Tensor:
    """[tokens, 2 heads, 64] with magnitudes from 1/16 to 64 and the awkward cases."""
    x = torch.randn(tokens, 2, 64, generator=generator) * 2.0 ** torch.randint(
        -4, 7, (tokens, 2, 1), generator=generator
    )
    x[0] = 0.0  # a zero head: int8's scale is 0
    x[1, 0, :4] = torch.tensor([-0.0, 1e-30, -1e-6, 3e-3])  # signed zero, fp8 subnormals
    x[2, 1, :3] = torch.tensor([1e6, -1e6, 500.0])  # past fp8 e4m3's 448: clamped
    return x


@pytest.mark.parametrize("name", list(FORMATS))
def test_stored_values_stay_within_the_formats_error(name):
    g = torch.Generator().manual_seed(0)
    x = _values(g)
    cache = make_kv_cache(4, 16, 2, 64, dtype=FORMATS[name])
    slots = torch.randperm(64, generator=g)[: len(x)]
    cache.write(x, -x, slots)
    keys = cache.read_slots(0, slots, torch.float32)
    values = cache.read_slots(1, slots, torch.float32)
    torch.testing.assert_close(values, -keys, rtol=0, atol=0)  # symmetric formats
    largest = torch.finfo(FORMATS[name]).max if name != "int8" else float("inf")
    normal = (x.abs() >= 2**-6) & (x.abs() <= largest)  # subnormals and clamps: below
    bound = RELATIVE_ERROR[name]
    # int8's step is its (token, head)'s largest magnitude / 127, a float's the value's own
    reference = x.abs().amax(dim=-1, keepdim=True).expand_as(x) if name == "int8" else x.abs()
    error = (keys - x).abs()
    assert (error[normal] <= bound * reference[normal] * (1 + 1e-6)).all()
    if largest < 1e6:
        assert keys[2, 1, :2].tolist() == [largest, -largest]  # clamped, not inf or NaN
    if name == "fp8_e4m3":
        assert (error[x.abs() < 2**-6] <= 2**-10).all()  # half e4m3's subnormal step
    assert not keys.isnan().any()


def test_int8_keeps_a_scale_per_token_and_head():
    x = torch.zeros(2, 3, 8)
    x[0, 0], x[0, 1], x[1, 2] = 1.0, 100.0, -0.01
    cache = Int8KVCache(1, 4, 3, 8, torch.int8)
    cache.write(x, x, torch.tensor([1, 3]))
    scales = cache.scales[0, 0]
    assert scales.dtype == torch.float16
    assert scales[1].tolist() == pytest.approx([1 / 127, 100 / 127, 0.0], rel=2**-11)
    assert scales[3].tolist() == pytest.approx([0.0, 0.0, 0.01 / 127], rel=2**-11)
    assert cache.data[0, 0, 3, 2].tolist() == [-127] * 8


def test_a_table_reads_the_same_values_as_its_slots():
    g = torch.Generator().manual_seed(1)
    for dtype in FORMATS.values():
        cache = random_cache(dtype, 6, 4, 2, 8, g)
        table = torch.tensor([[5, 0, 3], [2, 2, 1]])
        slots = (table[..., None] * 4 + torch.arange(4)).reshape(2, -1)
        for half in (0, 1):
            by_table = cache.read(half, table, torch.float32)
            by_slots = torch.stack([cache.read_slots(half, s, torch.float32) for s in slots])
            assert torch.equal(by_table, by_slots)


@pytest.mark.parametrize("name", ["float32", "int8", "fp8_e4m3"])
def test_copied_blocks_carry_their_values_and_scales(name):
    g = torch.Generator().manual_seed(2)
    cache = random_cache(FORMATS[name], 5, 4, 2, 8, g)
    before = clone_cache(cache)
    cache.copy_blocks(torch.tensor([1, 4]), torch.tensor([3, 0]))
    table_src, table_dst = torch.tensor([1, 4]), torch.tensor([3, 0])
    for half in (0, 1):
        read = cache.read(half, table_dst, torch.float32)
        assert torch.equal(read, before.read(half, table_src, torch.float32))
    assert torch.equal(
        cache.read(0, torch.tensor([2]), torch.float32),
        before.read(0, torch.tensor([2]), torch.float32),
    )  # untouched


def test_quantized_formats_fit_about_four_times_the_tokens():
    def per_token(name: str) -> int:
        dtype = resolve_kv_cache_dtype(name, torch.float32)
        cls = {torch.int8: Int8KVCache}.get(dtype, Fp8KVCache if dtype.itemsize == 1 else KVCache)
        return cls.bytes_per_token(3, 64, dtype)

    float32 = per_token("float32")
    assert float32 / per_token("int8") >= 3.85  # the scale costs 2 of 66 bytes a head
    assert float32 / per_token("fp8") == float32 / per_token("fp8_e5m2") == 4
    assert per_token("bfloat16") / per_token("int8") >= 1.9
    assert per_token("bfloat16") / per_token("fp8") == 2
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert set(KV_CACHE_DTYPES) == set(DTYPE_OF_NAME)  # the flag's choices all resolve
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        resolve_kv_cache_dtype("int4", torch.float32)


# ------------------------------------------------------------------- the C write


@pytest.fixture(scope="module")
def c_write():
    ptr, long = ctypes.c_void_p, ctypes.c_long
    # paged_kv_write(kv, key, ld_key, value, ld_value, slots, num_tokens)
    fn = cpu_kernels.kernel(
        cpu_decode.SOURCE, "paged_kv_write", (ptr, ptr, long, ptr, long, ptr, ctypes.c_int)
    )
    if fn is None:
        pytest.skip("the C kernel does not build here")
    return fn


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_c_write_stores_the_bits_torch_stores(name, c_write):
    """The fused decode writes keys and values in C: the same codes and scales as torch's
    conversion (nearest even, clamped), subnormals, signed zeros and clamps included."""
    g = torch.Generator().manual_seed(3)
    x = _values(g)
    dtype = FORMATS[name]
    by_torch = make_kv_cache(4, 16, 2, 64, dtype=dtype)
    by_c = make_kv_cache(4, 16, 2, 64, dtype=dtype)
    if isinstance(by_torch, Fp8KVCache):  # a scale that is not 1 must divide the same way
        by_torch.key_scale = by_c.key_scale = 0.37
    slots = torch.randperm(64, generator=g)[: len(x)]
    by_torch.write(x, x * 3, slots)
    value = (x * 3).contiguous()
    c_write(
        cpu_decode.c_view(by_c), x.data_ptr(), 128, value.data_ptr(), 128,
        slots.data_ptr(), len(x),
    )  # fmt: skip
    assert caches_equal(by_c, by_torch)


def test_fp8_ties_round_to_even_in_c_as_in_torch(c_write):
    """Values exactly between two fp8 codes (and between two subnormals)."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = e4m3[~e4m3.isnan()].unique()
    ties = ((finite[1:] + finite[:-1]) / 2)[None, None, :64]
    ties = torch.cat([ties, -ties], dim=1).expand(1, 2, 64).contiguous()
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        by_torch, by_c = Fp8KVCache(1, 1, 2, 64, dtype), Fp8KVCache(1, 1, 2, 64, dtype)
        slot = torch.tensor([0])
        by_torch.write(ties, ties, slot)
        c_write(cpu_decode.c_view(by_c), ties.data_ptr(), 128, ties.data_ptr(), 128,
                slot.data_ptr(), 1)  # fmt: skip
        assert caches_equal(by_c, by_torch)
