"""Embeddings through the paged engine: transformers' pooled hidden states to float
tolerance (last, mean, cls; chunked prompts), batched with generation in one step,
prefix-cache hits only where pooling allows them, preemption and aborts leak nothing."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, PoolingParams, SamplingParams
from pagedllm.benchmarks.datasets import english_corpus
from pagedllm.outputs import EmbeddingRequestOutput

pytestmark = pytest.mark.slow

# 32 inputs, 5 to ~110 tokens: with a 64-token budget the long ones come in chunks
TEXT = english_corpus()
INPUTS = [TEXT[i * 97 : i * 97 + 20 + 85 * (i % 6)] for i in range(32)]


@pytest.fixture(scope="module")
def llm():
    return LLM(exact_matmul=True, max_num_batched_tokens=64, seed=0)


def reference(hf_reference, ids: list[int], pooling: str) -> torch.Tensor:
    with torch.no_grad():
        states = hf_reference.model(torch.tensor([ids])).last_hidden_state[0]
    vector = {"last": states[-1], "mean": states.mean(0), "cls": states[0]}[pooling]
    return torch.nn.functional.normalize(vector, dim=0)


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_embeddings_match_transformers_pooled_states(llm, hf_reference, pooling):
    outs = llm.embed(INPUTS, PoolingParams(pooling=pooling), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    for text, out in zip(INPUTS, outs, strict=True):
        assert isinstance(out, EmbeddingRequestOutput) and out.finished
        ids = tokenizer.encode(text)
        assert out.prompt_token_ids == ids
        got = torch.tensor(out.outputs.embedding)
        assert got.shape == (llm.engine.model_config.hidden_size,)
        assert abs(got.norm().item() - 1) < 1e-5
        cosine = torch.dot(got, reference(hf_reference, ids, pooling)).item()
        assert cosine >= 0.999, (pooling, text[:20], cosine)
    m = llm.get_metrics()
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


def test_unnormalised_mean_is_the_plain_average(llm, hf_reference):
    [out] = llm.embed(INPUTS[7], PoolingParams(pooling="mean", normalize=False), use_tqdm=False)
    ids = llm.get_tokenizer().encode(INPUTS[7])
    with torch.no_grad():
        expected = hf_reference.model(torch.tensor([ids])).last_hidden_state[0].mean(0)
    torch.testing.assert_close(torch.tensor(out.outputs.embedding), expected, atol=1e-4, rtol=1e-4)


def test_embeddings_share_steps_with_generation_and_free_their_blocks(llm):
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    [alone] = llm.generate(INPUTS[6], greedy, use_tqdm=False)
    engine.add_request("gen", INPUTS[6], greedy)  # short
    engine.add_request("emb", INPUTS[0], PoolingParams())  # short
    engine.add_request("gone", TEXT[:1500], PoolingParams())  # ~300 tokens: in chunks
    first = engine.step()  # both prompts in one step; the short embedding ends in it
    assert [o.request_id for o in first if isinstance(o, EmbeddingRequestOutput)] == ["emb"]
    engine.abort_request("gone")  # mid-prompt: aborted with nothing kept
    outs = {}
    while engine.has_unfinished_requests():
        outs |= {o.request_id: o for o in engine.step() if o.finished}
    assert outs["gen"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert "gone" not in outs
    engine.check_invariants()
    engine.step()  # the runner forgets finished requests when the next step says so
    assert not engine.runner.live_request_ids()
    m = llm.get_metrics()
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


def test_preempted_and_prefix_cached_poolings_stay_exact(hf_reference):
    """Decoding requests growing in a small pool preempt embeddings mid-prompt: their
    partial sums start over. A repeated input hits the prefix cache for `last` only."""
    tight = LLM(exact_matmul=True, num_kv_blocks=14, max_num_batched_tokens=48)
    engine = tight.engine
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"g{i}", TEXT[i * 500 : i * 500 + 150], greedy)
    inputs = {f"e{i}": TEXT[5000 + i * 400 : 5500 + i * 400] for i in range(3)}
    for request_id, text in inputs.items():
        engine.add_request(request_id, text, PoolingParams(pooling="mean"))
    outs = {}
    while engine.has_unfinished_requests():
        outs |= {o.request_id: o for o in engine.step() if o.finished}
    assert tight.get_metrics()["num_preemptions_total"] > 0
    tokenizer = tight.get_tokenizer()
    for request_id, text in inputs.items():
        ids = tokenizer.encode(text)
        got = torch.tensor(outs[request_id].outputs.embedding)
        assert torch.dot(got, reference(hf_reference, ids, "mean")).item() >= 0.999
    before = tight.get_metrics()["prefix_cache_hits"]
    tight.embed(inputs["e0"], PoolingParams(pooling="mean"), use_tqdm=False)
    assert tight.get_metrics()["prefix_cache_hits"] == before  # mean reads every position
    tight.embed(inputs["e0"], PoolingParams(pooling="last"), use_tqdm=False)
    assert tight.get_metrics()["prefix_cache_hits"] > before
    m = tight.get_metrics()
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


def test_bad_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be one of"):
        PoolingParams(pooling="max")
    with pytest.raises(ValueError, match="pooling must be one of"):
        LLM(pooling="sum")
