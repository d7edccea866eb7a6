"""Our Llama over the paged cache computes what transformers computes on the same GGUF."""

from __future__ import annotations

import itertools

import pytest
import torch

from pagedllm.attention import AttentionMetadata
from pagedllm.worker.kv_cache import allocate_kv_cache
from tests.conftest import ENGLISH

pytestmark = pytest.mark.slow

BLOCK = 16
TOL = 1e-3


def new_kv_caches(model, num_blocks):
    c = model.config
    return allocate_kv_cache(c, num_blocks, BLOCK, torch.float32, torch.device("cpu"))


def scattered_tables(lengths, max_new, num_blocks, seed=0):
    """Block tables drawn at random from the pool: neither contiguous nor in order."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in lengths:
        need = -(-(n + max_new) // BLOCK)
        tables.append(perm[used : used + need])
        used += need
    return tables


def forward(model, kv, chunks, seq_lens, tables):
    """One flat batch: chunks[i] are sequence i's new tokens, seq_lens[i] its length after."""
    meta = AttentionMetadata.build(seq_lens, [len(c) for c in chunks], tables, BLOCK)
    ids = torch.tensor([t for c in chunks for t in c])
    with torch.no_grad():
        hidden = model(ids, meta.positions, kv, meta)
        last = meta.query_start_loc[1:] - 1
        return model.compute_logits(hidden[last])


@pytest.fixture(scope="module")
def prompts(tokenizer):
    long_ids = tokenizer.encode(ENGLISH * 6)[:317]
    chat = tokenizer.encode_chat([{"role": "user", "content": "What is a page table?"}])
    return [
        long_ids,
        [tokenizer.bos_token_id],
        tokenizer.encode("Paris is the capital of"),
        chat,
        tokenizer.encode(ENGLISH)[:45],
        tokenizer.encode("def fibonacci(n):\n    ")[:20],
    ]


def test_batch_prefill_then_paged_decode_matches_reference(model_f32, hf_reference, prompts):
    assert len(prompts[0]) > 300 and len(prompts[1]) == 1
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(lengths)
    num_blocks = 96
    tables = scattered_tables(lengths, 10, num_blocks)
    kv = new_kv_caches(model_f32, num_blocks)
    ours = forward(model_f32, kv, prompts, lengths, tables)

    ref_past, ref_logits = [], []
    with torch.no_grad():
        for p in prompts:
            out = hf_reference(torch.tensor([p]), use_cache=True)
            ref_past.append(out.past_key_values)
            ref_logits.append(out.logits[0, -1])
    for i in range(len(prompts)):
        assert (ours[i] - ref_logits[i]).abs().max() < TOL, f"prompt {i}"

    seq_lens = list(lengths)
    for step in range(10):
        next_tokens = [int(r.argmax()) for r in ref_logits]
        seq_lens = [n + 1 for n in seq_lens]
        ours = forward(model_f32, kv, [[t] for t in next_tokens], seq_lens, tables)
        with torch.no_grad():
            for i, t in enumerate(next_tokens):
                out = hf_reference(torch.tensor([[t]]), past_key_values=ref_past[i], use_cache=True)
                ref_past[i] = out.past_key_values
                ref_logits[i] = out.logits[0, -1]
        for i in range(len(prompts)):
            diff = (ours[i] - ref_logits[i]).abs().max()
            assert diff < TOL, f"decode step {step}, prompt {i}: {diff}"


def test_chunked_prefill_equals_one_call(model_f32, prompts):
    prompt = prompts[0]
    num_blocks = 40
    [table] = scattered_tables([len(prompt)], 0, num_blocks, seed=1)
    whole = forward(
        model_f32, new_kv_caches(model_f32, num_blocks), [prompt], [len(prompt)], [table]
    )
    kv = new_kv_caches(model_f32, num_blocks)
    cuts = [0, 100, 213, len(prompt)]
    for a, b in itertools.pairwise(cuts):
        chunked = forward(model_f32, kv, [prompt[a:b]], [b], [table])
    assert (chunked - whole).abs().max() < TOL


def test_mixed_batch_of_prefill_chunk_and_decodes(model_f32, hf_reference, prompts):
    """A chunk continuing from cached blocks and decodes in the same flat batch."""
    a, b = prompts[0], prompts[2]
    num_blocks = 64
    tables = scattered_tables([len(a), len(b)], 1, num_blocks, seed=2)
    kv = new_kv_caches(model_f32, num_blocks)
    forward(model_f32, kv, [a[:150], b], [150, len(b)], tables)
    extra = 13
    ours = forward(model_f32, kv, [a[150:], [extra]], [len(a), len(b) + 1], tables)
    with torch.no_grad():
        ref_a = hf_reference(torch.tensor([a])).logits[0, -1]
        ref_b = hf_reference(torch.tensor([[*b, extra]])).logits[0, -1]
    assert (ours[0] - ref_a).abs().max() < TOL
    assert (ours[1] - ref_b).abs().max() < TOL
