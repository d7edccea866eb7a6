"""The Triton paged-attention kernels equal plain contiguous attention (and the torch
backend): random lengths, shuffled block tables, GQA, cached prefixes, sliding windows.

They run on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports triton); with TRITON_INTERPRET=0 on a CUDA
machine the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("triton")

import torch

from pagedllm.attention import (
    AttentionMetadata,
    cpu_decode,
    make_kv_cache,
    torch_backend,
    triton_backend,
)
from tests.attention.kv_caches import caches_equal, clone_cache

DEVICE = "cpu" if triton_backend.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("compiled Triton kernels need a CUDA device", allow_module_level=True)


class Batch:
    """A flat batch of sequences (cached context + new tokens each) over a cache whose
    every slot holds random values, blocks handed out in shuffled order."""

    def __init__(
        self,
        context_lens: list[int],
        query_lens: list[int],
        block_size: int = 4,
        dtype: torch.dtype = torch.float32,
        cache_dtype: torch.dtype | None = None,
        window: int | None = None,
        seed: int = 0,
        heads: tuple[int, int] = (4, 2),  # query heads, KV heads: two queries per KV head
        head_dim: int = 16,
    ) -> None:
        num_heads, num_kv_heads = heads
        self.scale = head_dim**-0.5
        gen = torch.Generator().manual_seed(seed)
        self.seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
        counts = [-(-n // block_size) for n in self.seq_lens]
        num_blocks = sum(counts) + 3  # spare blocks: junk no sequence may read
        ids = torch.randperm(num_blocks, generator=gen).tolist()
        self.tables = [ids[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(len(counts))]
        cache_dtype = cache_dtype or dtype
        self.cache = make_kv_cache(
            num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype, device=DEVICE
        )
        slots = torch.arange(num_blocks * block_size, device=DEVICE)
        shape = (len(slots), num_kv_heads, head_dim)
        old_k, old_v = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(2))
        self.cache.write(old_k, old_v, slots)
        self.cache.sliding_window = window
        tokens = sum(query_lens)
        # as the model passes them: Q and K side by side in one tensor (Q's rows strided)
        qk = torch.randn(tokens, num_heads + num_kv_heads, head_dim, generator=gen)
        qk = qk.to(device=DEVICE, dtype=dtype)
        self.query, self.key = qk.split([num_heads, num_kv_heads], dim=1)
        self.value = torch.randn(tokens, num_kv_heads, head_dim, generator=gen)
        self.value = self.value.to(device=DEVICE, dtype=dtype)
        self.meta = AttentionMetadata.build(
            self.seq_lens, query_lens, self.tables, block_size, device=DEVICE
        )
        self.query_lens = query_lens

    def expected(self) -> torch.Tensor:
        """Contiguous float64 attention over what the cache holds after the step's write."""
        outs = []
        for seq_len, q_len, table, start in zip(
            self.seq_lens,
            self.query_lens,
            self.tables,
            self.meta.query_start_loc.tolist(),
            strict=False,
        ):
            blocks = torch.tensor(table, device=DEVICE)
            k = self.cache.read(0, blocks, torch.float64)[:seq_len].cpu()
            v = self.cache.read(1, blocks, torch.float64)[:seq_len].cpu()
            q = self.query[start : start + q_len].double().cpu()
            outs.append(contiguous_attention(q, k, v, self.scale, self.cache.sliding_window))
        return torch.cat(outs)


def contiguous_attention(q, k, v, scale, window=None):
    """Causal attention of one sequence's last len(q) positions over all of k/v."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(len(k) - len(q), len(k))[:, None]
    k_pos = torch.arange(len(k))[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    scores = scores.masked_fill(~visible, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def triton_attention(batch: Batch) -> torch.Tensor:
    return triton_backend.paged_attention(
        batch.query, batch.key, batch.value, batch.cache, batch.meta, batch.scale
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(actual.cpu().double(), expected, atol=tol, rtol=tol)


# A 70-token chunk over 37 cached positions (two of the prefill kernel's default 64-token
# tiles), a whole 23-token prompt, a one-token prompt and two decodes, in one flat batch.
MIXED = ([37, 0, 5, 0, 90], [70, 23, 1, 1, 1])


@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_reads_shuffled_blocks_in_place(block_size):
    batch = Batch([0, 3, 16, 63, 64, 130], [1] * 6, block_size=block_size)
    assert batch.meta.decode_only
    assert_close(triton_attention(batch), batch.expected())


@pytest.mark.parametrize("block_n", [16, 32])
def test_decode_tiles_shorter_than_the_sequence(block_n):
    batch = Batch([5, 40, 77], [1] * 3, block_size=4, seed=1)
    meta = batch.meta
    batch.cache.write(batch.key, batch.value, meta.slot_mapping)
    out = torch.full_like(batch.query, math.nan)
    triton_backend.paged_decode(
        batch.query, batch.cache, meta.decode_block_tables, meta.decode_seq_lens,
        meta.decode_token_idx, batch.scale, out, block_n=block_n,
    )  # fmt: skip
    assert_close(out, batch.expected())


def test_decode_row_of_no_positions_gives_zeros():
    """A padded row (length 0, as a CUDA-graph batch padded to its captured size may
    hold) comes out as zeros, not NaN, and leaves the other rows alone."""
    batch = Batch([4, 9], [1, 1], seed=9)
    meta = batch.meta
    batch.cache.write(batch.key, batch.value, meta.slot_mapping)
    seq_lens = meta.decode_seq_lens.clone()
    seq_lens[0] = 0
    out = torch.full_like(batch.query, math.nan)
    triton_backend.paged_decode(
        batch.query, batch.cache, meta.decode_block_tables, seq_lens,
        meta.decode_token_idx, batch.scale, out,
    )  # fmt: skip
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    assert_close(out[1:], batch.expected()[1:])


@pytest.mark.parametrize("block_size", [4, 16])
def test_prefill_over_cached_prefix_with_decodes_in_the_batch(block_size):
    batch = Batch(*MIXED, block_size=block_size, seed=2)
    assert batch.meta.prefill_seq_idx and batch.meta.decode_seq_idx.numel()
    assert_close(triton_attention(batch), batch.expected())


def test_prefill_small_tiles_cross_block_and_chunk_boundaries():
    batch = Batch([9, 0, 21], [30, 17, 2], block_size=4, seed=3)
    meta = batch.meta
    batch.cache.write(batch.key, batch.value, meta.slot_mapping)
    out = torch.full_like(batch.query, math.nan)
    triton_backend.varlen_prefill(
        batch.query, batch.cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        max(batch.query_lens), batch.scale, out, block_m=16, block_n=16,
    )  # fmt: skip
    assert_close(out, batch.expected())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_model_shapes(dtype):
    """SmolLM2-135M's attention: 9 query heads over 3 KV heads (a group of 3, padded to
    the decode tile's 16 rows), head_dim 64, blocks of 16, the default tiles."""
    batch = Batch(*MIXED, block_size=16, dtype=dtype, heads=(9, 3), head_dim=64, seed=10)
    assert_close(
        triton_attention(batch), batch.expected(), tol=1e-4 if dtype == torch.float32 else 2e-2
    )


@pytest.mark.parametrize("window", [1, 7, 200])
def test_sliding_window(window):
    batch = Batch(*MIXED, block_size=4, window=window, seed=4)
    assert_close(triton_attention(batch), batch.expected())


def test_matches_torch_backend(monkeypatch):
    """Same output and same cache contents as the portable backend, mixed batch, window."""
    monkeypatch.setattr(cpu_decode, "supports", lambda *a: False)  # its gather path
    batch = Batch(*MIXED, block_size=4, window=11, seed=5)
    torch_cache = clone_cache(batch.cache)
    expected = torch_backend.paged_attention(
        batch.query, batch.key, batch.value, torch_cache, batch.meta, batch.scale
    )
    torch.testing.assert_close(triton_attention(batch), expected, atol=1e-4, rtol=1e-4)
    assert caches_equal(batch.cache, torch_cache)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_queries_and_cache(dtype):
    batch = Batch(*MIXED, block_size=16, dtype=dtype, seed=6)
    out = triton_attention(batch)
    assert out.dtype == dtype
    assert_close(out, batch.expected(), tol=2e-2)


def test_float32_queries_over_a_bfloat16_cache():
    """Queries attend to what the cache holds, new tokens included (as the torch backend)."""
    batch = Batch(*MIXED, block_size=4, cache_dtype=torch.bfloat16, seed=7)
    assert_close(triton_attention(batch), batch.expected())


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_caches_are_left_to_the_torch_backend(cache_dtype):
    batch = Batch([3], [2], cache_dtype=cache_dtype)
    assert not triton_backend.supports(batch.cache)
    with pytest.raises(NotImplementedError, match="torch backend"):
        triton_attention(batch)


def test_lengths_come_from_host_metadata(monkeypatch):
    """No device→host copy of a length per layer: .tolist()/.item() are never called."""
    batch = Batch(*MIXED, block_size=4, seed=8)

    def no_sync(*args):
        raise AssertionError("device→host copy in the attention call")

    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    out = triton_attention(batch)
    monkeypatch.undo()
    assert_close(out, batch.expected())


def test_the_backend_is_chosen_once_by_device_and_cache_dtype():
    """Triton's kernels on CUDA for float caches; the torch path (the CPU's C decode
    kernel) everywhere else, and for int8/fp8 caches; a built model's layers call it."""
    from pagedllm.attention import paged_attention, select_attention
    from pagedllm.model.models.llama import LlamaAttention, use_attention_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert select_attention(cuda, torch.bfloat16) is triton_backend.paged_attention
    assert select_attention(cuda, torch.int8) is paged_attention
    assert select_attention(cpu, torch.float32) is paged_attention
    layer = LlamaAttention.__new__(LlamaAttention)
    torch.nn.Module.__init__(layer)
    assert layer.attend is paged_attention  # the default, unbound
    use_attention_backend(layer, triton_backend.paged_attention)
    assert layer.attend is triton_backend.paged_attention


def test_the_torch_backend_reads_no_length_back_from_the_device(monkeypatch):
    """The portable path plans from the metadata's host lists too (on CUDA a `.tolist()`
    per layer is a sync per layer)."""
    monkeypatch.setattr(cpu_decode, "supports", lambda *a: False)  # the device path
    batch = Batch(*MIXED, block_size=4, window=11, seed=9)

    def no_sync(*args):
        raise AssertionError("device→host copy in the attention call")

    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    out = torch_backend.paged_attention(
        batch.query, batch.key, batch.value, batch.cache, batch.meta, batch.scale
    )
    monkeypatch.undo()
    assert_close(out, batch.expected())
