"""Tensor parallelism: how a model is shared out, and two ranks answering as one."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.config import EngineArgs
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.model.config import ModelArchConfig
from pagedllm.model.loader import load_tensors
from pagedllm.model.parallel import BLOCK, shard_for, shard_tensors
from pagedllm.worker import worker as worker_module
from pagedllm.worker.executor import WorkerDiedError

PROMPTS = [
    "The capital of France is",
    "Write a poem about the sea:",
    "1, 2, 3, 4,",
    "def fib(n):",
    "Once upon a time, in a land far away, there lived a",
    "The three laws of thermodynamics are",
]


def arch(heads: int, kv_heads: int, inter: int = 1536, vocab: int = 49152) -> ModelArchConfig:
    return ModelArchConfig("llama", 2, 576, heads, kv_heads, 64, inter, vocab)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "size"),
    [(9, 3, 2), (9, 3, 3), (32, 8, 4), (32, 8, 3), (32, 8, 16), (8, 2, 8), (4, 4, 1)],
)
def test_every_head_column_and_token_has_one_owner(heads, kv_heads, size):
    config = arch(heads, kv_heads, inter=1000 if size == 3 else 1536, vocab=49157)
    shards = [shard_for(config, size, rank) for rank in range(size)]
    group = heads // kv_heads
    q_owned = [h for s in shards for h in range(*s.q_heads)]
    assert sorted(q_owned) == list(range(heads))  # each query head exactly once
    for s in shards:  # a query head sits with its KV head
        assert all(s.kv_heads[0] <= h // group < s.kv_heads[1] for h in range(*s.q_heads))
        assert s.q_heads[1] > s.q_heads[0] and s.kv_heads[1] > s.kv_heads[0]
    for field, total in (("intermediate", config.intermediate_size), ("vocab", 49157)):
        ranges = [getattr(s, field) for s in shards]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    if config.intermediate_size % BLOCK == 0:  # quantized columns split by whole blocks
        assert all(s.intermediate[0] % BLOCK == 0 for s in shards)


def test_splits_the_heads_do_not_allow_are_refused():
    with pytest.raises(ValueError, match="does not split"):
        shard_for(arch(9, 3), 4, 0)
    with pytest.raises(ValueError, match="tensor parallelism supports"):
        shard_for(ModelArchConfig("gemma3", 2, 640, 4, 1, 256, 2048, 1000), 2, 0)


def test_a_rank_keeps_exactly_its_slices_of_the_quantized_blocks(default_model_path):
    """Row- and column-parallel shares of the file's blocks are the dequantized slices."""
    _, config, tensors = load_tensors(default_model_path, None, quantized=True)
    shard = shard_for(config, 2, 1)
    mine = shard_tensors(tensors, config, shard)
    d = config.head_dim
    for name, rows, cols in [
        ("model.layers.3.self_attn.q_proj.weight", [h * d for h in shard.q_heads], None),
        ("model.layers.3.self_attn.o_proj.weight", None, [h * d for h in shard.q_heads]),
        ("model.layers.3.mlp.down_proj.weight", None, list(shard.intermediate)),
        ("model.embed_tokens.weight", list(shard.vocab), None),
    ]:
        whole, part = tensors[name], mine[name]
        full = whole.dequantize() if hasattr(whole, "dequantize") else whole
        got = part.dequantize() if hasattr(part, "dequantize") else part
        expected = full[rows[0] : rows[1]] if rows else full[:, cols[0] : cols[1]]
        assert got.shape == expected.shape and bool((got == expected).all()), name


@pytest.mark.slow
def test_an_idle_engine_keeps_its_ranks_and_a_dead_rank_stops_it(monkeypatch):
    """Ranks wait for the next step however long the engine idles (past the collectives'
    timeout); an error of rank 0's after the collectives fails one step; a rank killed
    mid-service fails the next step's requests with a clear error and the engine reports
    itself stopped (the server's /health: 503) instead of hanging."""
    monkeypatch.setenv("PAGEDLLM_TP_TIMEOUT_S", "2")  # the spawned rank reads it too
    monkeypatch.setattr(worker_module, "COLLECTIVE_TIMEOUT_S", 2.0)
    engine = AsyncLLM.from_engine_args(
        EngineArgs(exact_matmul=True, threads=1, kv_cache_memory=0.05, tensor_parallel_size=2)
    )
    params = SamplingParams(max_tokens=8, temperature=0)

    async def ask(request_id: str) -> str:
        text = ""
        async for delta in engine.generate(request_id, "Hello", params):
            text += delta.outputs[0].text
        return text

    try:
        first = asyncio.run(ask("a"))
        time.sleep(3)  # idle past the timeout
        assert asyncio.run(ask("b")) == first
        # rank 0's own error after the step's last collective fails only that step
        runner = engine.engine.runner
        sampler = runner.sampler

        def fail_once(*args):
            runner.sampler = sampler
            raise RuntimeError("a sampler bug")

        runner.sampler = fail_once
        with pytest.raises(Exception, match="a sampler bug"):
            asyncio.run(ask("x"))
        assert engine.is_running and asyncio.run(ask("y")) == first  # the ranks in step
        rank = engine.engine.executor.processes[0]
        rank.kill()
        rank.join(5)
        started = time.monotonic()
        with pytest.raises(Exception, match="rank 1 \\(exit code -9\\) died"):
            asyncio.run(ask("c"))
        assert time.monotonic() - started < 30
        assert not engine.is_running
        assert isinstance(engine.dead_error, WorkerDiedError)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def pair():
    """The same model on one rank and on two (exact float32 path, one thread a rank)."""
    args = dict(exact_matmul=True, threads=1, kv_cache_memory=0.05, seed=0)
    with LLM(**args) as one, LLM(tensor_parallel_size=2, **args) as two:
        yield one, two


@pytest.mark.slow
def test_two_ranks_answer_as_one(pair):
    one, two = pair
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=2)
    alone, split = one.generate(PROMPTS, params), two.generate(PROMPTS, params)
    for a, b in zip(alone, split, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            for token, lp in la.items():
                assert lb[token].logprob == pytest.approx(lp.logprob, abs=1e-3)
    # each rank holds a share: rank 0 has two of the three KV heads, so fewer bytes of
    # weights and of KV per block, and the pool (its size fixed in bytes) more blocks
    w1, w2 = one.engine.executor.driver, two.engine.executor.driver
    assert w2.weight_bytes() < 0.6 * w1.weight_bytes()
    assert w2.block_bytes * 3 == w1.block_bytes * 2
    assert w2.num_blocks > w1.num_blocks
    metrics = two.engine.get_metrics()
    assert metrics["num_free_kv_blocks"] == metrics["num_kv_blocks"]  # nothing leaked
