"""Paged attention equals plain contiguous attention, whatever the block layout and the
cache's storage format (over the values the format stores; their distance from the float
values is bounded below)."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from pagedllm import cpu_kernels
from pagedllm.attention import AttentionMetadata, cpu_decode, make_kv_cache, paged_attention
from tests.attention.kv_caches import FORMATS, random_cache

PORTABLE_FLAGS = ("-O2", "-fopenmp", "-shared", "-fPIC", "-std=c11")  # no -march: no AVX2


def _kernel_built_with(directory, flags):
    target = directory / "kernel.so"
    cpu_kernels.build(cpu_kernels.c_compiler(), cpu_decode.SOURCE, target, flags)
    lib = ctypes.CDLL(str(target))
    return cpu_kernels.declare(lib, "paged_decode_attention", *cpu_decode.ARGTYPES)


@pytest.fixture(scope="module")
def portable_kernel(tmp_path_factory):
    return _kernel_built_with(tmp_path_factory.mktemp("portable"), PORTABLE_FLAGS)


@pytest.fixture(scope="module")
def avx2_kernel(tmp_path_factory):
    """The AVX2 build (8-float vectors), where the CPU runs it: the best level here may be
    AVX-512, whose 16-float path is the one the other fixtures test."""
    if "avx2" not in cpu_kernels.supported_levels():
        pytest.skip("this CPU has no AVX2")
    return _kernel_built_with(tmp_path_factory.mktemp("avx2"), cpu_kernels.level_flags("avx2"))


@pytest.fixture(params=["c-kernel", "torch-gather", "portable-c-kernel", "avx2-c-kernel"])
def decode_calls(request, monkeypatch):
    """Run decodes through the CPU kernel (as built here, for AVX2, or without -march), or
    torch.

    Yields the list of kernel calls (None on the torch path), for tests to check the
    kernel really ran.
    """
    if request.param == "torch-gather":
        monkeypatch.setattr(cpu_decode, "supports", lambda *a: False)
        yield None
        return
    kernel = cpu_decode.paged_decode_kernel()
    if kernel is None:
        pytest.skip("the C kernel does not build here")
    if request.param in ("portable-c-kernel", "avx2-c-kernel"):
        kernel = request.getfixturevalue(request.param.replace("-c-", "_"))
    calls: list[int] = []
    original = cpu_decode.paged_decode

    def counted(*args):
        calls.append(1)
        return original(*args, kernel=kernel)

    monkeypatch.setattr(cpu_decode, "paged_decode", counted)
    yield calls


def reference_attention(q, k, v, scale, window=None):
    """Causal attention of one sequence's last len(q) queries over all of k/v, contiguous
    (each query over its last `window` positions only, when given)."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(lk - lq, lk)[:, None]
    k_pos = torch.arange(lk)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, -math.inf)
    if window is not None:
        scores = scores.masked_fill(k_pos <= q_pos - window, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: int(torch.randint(s[0], s[1], (1,), generator=g))  # noqa: E731
    block_size = [1, 4, 16, 32][rand(0, 4)]
    num_kv_heads = rand(1, 4)
    group = [1, 2, 3, 4, 5, 7][rand(0, 6)]  # past 4: the vector kernel takes 4 at a time
    head_dim = [8, 16, 64][rand(0, 3)]
    num_seqs = rand(1, 7)
    seq_lens = [rand(1, 90) for _ in range(num_seqs)]
    # each sequence: some context already cached, the rest new (decode, prefill or chunk)
    query_lens = []
    for n in seq_lens:
        kind = rand(0, 3)
        query_lens.append(1 if kind == 0 else n if kind == 1 else rand(1, n + 1))
    return g, block_size, num_kv_heads, group, head_dim, seq_lens, query_lens


def stored(dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """x [T, Hkv, D] as a cache of `dtype` gives it back."""
    cache = make_kv_cache(-(-len(x) // 4), 4, x.shape[1], x.shape[2], dtype=dtype)
    slots = torch.arange(len(x))
    cache.write(x, x, slots)
    return cache.read_slots(0, slots, torch.float32)


def run_case(seed: int, dtype: torch.dtype, reference_values=stored, window=None):
    """A random batch of decodes, prefills and chunks over scattered blocks: the output
    per sequence and the reference over `reference_values(dtype, k)`, `(..., v)` (a
    sliding-window layer's when `window` is given)."""
    g, block_size, hkv, group, head_dim, seq_lens, query_lens = _case(seed)
    hq = hkv * group
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 5
    # scattered, out-of-order physical blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for need in blocks_needed:
        tables.append(perm[used : used + need])
        used += need
    kv_cache = random_cache(dtype, num_blocks, block_size, hkv, head_dim, g)
    kv_cache.sliding_window = window
    full_k = [torch.randn(n, hkv, head_dim, generator=g) for n in seq_lens]
    full_v = [torch.randn(n, hkv, head_dim, generator=g) for n in seq_lens]
    # write the cached context, as earlier steps would have
    for table, n, q_len, k, v in zip(tables, seq_lens, query_lens, full_k, full_v, strict=True):
        pos = torch.arange(n - q_len)
        slots = torch.tensor(table, dtype=torch.int64)[pos // block_size] * block_size
        kv_cache.write(k[: n - q_len], v[: n - q_len], slots + pos % block_size)
    meta = AttentionMetadata.build(seq_lens, query_lens, tables, block_size)
    q_all = [torch.randn(q_len, hq, head_dim, generator=g) for q_len in query_lens]

    def new(xs):
        return torch.cat([x[n - ql :] for x, n, ql in zip(xs, seq_lens, query_lens, strict=True)])

    scale = head_dim**-0.5
    out = paged_attention(torch.cat(q_all), new(full_k), new(full_v), kv_cache, meta, scale)
    starts = meta.query_start_loc.tolist()
    for i, (q, k, v) in enumerate(zip(q_all, full_k, full_v, strict=True)):
        k, v = reference_values(dtype, k), reference_values(dtype, v)
        yield out[starts[i] : starts[i + 1]], reference_attention(q, k, v, scale, window)
    return query_lens


CASES = [("float32", seed) for seed in range(40)]
CASES += [(name, seed) for name in FORMATS if name != "float32" for seed in range(12)]


@pytest.mark.parametrize(("kv_dtype", "seed"), CASES)
def test_paged_attention_matches_contiguous_reference(kv_dtype, seed, decode_calls):
    """Decodes (C kernel or torch), prefills and chunks over cached blocks, in every
    format: within float32 rounding of attention over the values the cache stores."""
    decoded = False
    for out, expected in run_case(seed, FORMATS[kv_dtype]):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        decoded |= out.shape[0] == 1
    if decode_calls is not None and decoded:
        assert decode_calls, "the decodes did not go through the C kernel"


@pytest.mark.parametrize("seed", range(24))
def test_sliding_window_attention_matches_the_windowed_reference(seed, decode_calls):
    """A sliding-window layer's queries see their last `window` positions, in decodes
    (C kernel or torch), whole prefills and chunks over cached blocks."""
    window = [1, 5, 16, 33, 64][seed % 5]
    decoded = False
    for out, expected in run_case(seed, torch.float32, window=window):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        decoded |= out.shape[0] == 1
    if decode_calls is not None and decoded:
        assert decode_calls, "the decodes did not go through the C kernel"


# Largest |output - float reference| over the random cases (unit-variance keys, values
# and queries), by format: the bound each format is held to. Measured worst (2026-12-03):
# bf16 0.0095, f16 0.0010, int8 0.022, fp8 e4m3 0.147, e5m2 0.247; one format step of
# the output is about the relative step of the format (2^-8 … 2^-3).
ERROR_BOUNDS = {
    "bfloat16": 0.015,
    "float16": 0.002,
    "int8": 0.035,
    "fp8_e4m3": 0.2,
    "fp8_e5m2": 0.35,
}


@pytest.mark.parametrize("kv_dtype", list(ERROR_BOUNDS))
def test_quantized_attention_stays_near_the_float_result(kv_dtype):
    """Against attention over the float keys and values (no format at all)."""
    worst = 0.0
    for seed in range(12):
        for out, expected in run_case(seed, FORMATS[kv_dtype], lambda _, x: x):
            worst = max(worst, float((out - expected).abs().max()))
    assert worst <= ERROR_BOUNDS[kv_dtype], worst
    assert worst > 0  # the format did round something


def test_shared_blocks_between_sequences_are_read_not_clobbered(decode_calls):
    """Two sequences whose tables share a full prefix block see the same prefix keys."""
    g = torch.Generator().manual_seed(0)
    block_size, hkv, hq, d = 4, 2, 4, 8
    kv_cache = make_kv_cache(6, block_size, hkv, d, dtype=torch.float32)
    prefix_k, prefix_v = torch.randn(4, hkv, d, generator=g), torch.randn(4, hkv, d, generator=g)
    kv_cache.write(prefix_k, prefix_v, torch.arange(12, 16))
    tables = [[3, 1], [3, 5]]  # block 3 shared, each then has its own
    seq_lens, query_lens = [6, 5], [2, 1]
    ks = [torch.randn(2, hkv, d, generator=g), torch.randn(1, hkv, d, generator=g)]
    vs = [torch.randn(2, hkv, d, generator=g), torch.randn(1, hkv, d, generator=g)]
    # sequence 0 has position 4 cached in block 1 already? no: its 2 new tokens are 4 and 5
    meta = AttentionMetadata.build(seq_lens, query_lens, tables, block_size)
    qs = [torch.randn(2, hq, d, generator=g), torch.randn(1, hq, d, generator=g)]
    out = paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), kv_cache, meta, d**-0.5)
    torch.testing.assert_close(kv_cache.data[0, 3], prefix_k)  # the shared block is untouched
    for i in range(2):
        k = torch.cat([prefix_k, ks[i]])
        v = torch.cat([prefix_v, vs[i]])
        s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        torch.testing.assert_close(
            out[s:e], reference_attention(qs[i], k, v, d**-0.5), atol=1e-5, rtol=1e-4
        )
    assert decode_calls is None or decode_calls


def test_slot_mapping_and_positions_follow_block_tables():
    meta = AttentionMetadata.build([5, 3], [2, 3], [[7, 2], [4]], block_size=4)
    assert meta.positions.tolist() == [3, 4, 0, 1, 2]
    assert meta.slot_mapping.tolist() == [7 * 4 + 3, 2 * 4 + 0, 16, 17, 18]
    assert meta.query_start_loc.tolist() == [0, 2, 5]


@pytest.mark.parametrize("seed", range(5))
def test_decode_only_metadata_equals_the_general_build(seed):
    """The decode-step shortcut of AttentionMetadata.build gives the general path's fields."""
    import dataclasses
    import random

    from pagedllm.attention.metadata import AttentionMetadata

    rng = random.Random(seed)
    block = rng.choice([1, 4, 16])
    lens = [rng.randint(1, 90) for _ in range(rng.randint(1, 9))]
    tables = [rng.sample(range(400), -(-n // block)) for n in lens]
    fast = AttentionMetadata.build(lens, [1] * len(lens), tables, block)
    general = AttentionMetadata._general(lens, [1] * len(lens), tables, block, "cpu")
    for field in dataclasses.fields(AttentionMetadata):
        a, b = getattr(fast, field.name), getattr(general, field.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), field.name
        else:
            assert a == b, field.name
