"""The engine end to end: greedy parity with transformers, batching, preemption, sampling, n > 1."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.invariants import InvariantError
from pagedllm.core.sched_output import SchedulerOutput
from tests.conftest import ENGLISH

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", exact_matmul=True, kv_cache_memory=0.5, seed=0)


@pytest.fixture(scope="module")
def parity_prompts(tokenizer):
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name three planets."}])
    return [
        "Paris is the capital of",
        "def fibonacci(n):",
        chat,
        (ENGLISH * 5)[:1800],  # over 300 tokens
        "1, 2, 3, 4,",
        "The quick brown fox",
    ]


def reference_greedy(hf_reference, ids, steps):
    """transformers' incremental greedy decoding (KV cache), EOS ignored."""
    out_ids = []
    with torch.no_grad():
        out = hf_reference(torch.tensor([ids]), use_cache=True)
        for _ in range(steps):
            token = int(out.logits[0, -1].argmax())
            out_ids.append(token)
            out = hf_reference(
                torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
            )
    return out_ids


@pytest.fixture(scope="module")
def expected(hf_reference, tokenizer, parity_prompts):
    chat_prompt = parity_prompts[2]
    result = []
    for p in parity_prompts:
        ids = tokenizer.encode(p, add_special_tokens=p is not chat_prompt)
        result.append(reference_greedy(hf_reference, ids, NEW_TOKENS))
    assert len(tokenizer.encode(parity_prompts[3])) > 300
    return result


@pytest.fixture(scope="module")
def long_prompt_logprobs(hf_reference, tokenizer, parity_prompts):
    """transformers' log-softmax over every position of the long parity prompt."""
    ids = tokenizer.encode(parity_prompts[3])
    with torch.no_grad():
        return ids, torch.log_softmax(hf_reference(torch.tensor([ids])).logits[0].float(), -1)


def check_prompt_logprobs(out, ids, reference, num):
    """Entry t scores prompt token t under the logits of position t-1, with the top `num`."""
    got = out.prompt_logprobs
    assert got[0] is None and len(got) == len(ids)
    for t in range(1, len(ids)):
        row = reference[t - 1]
        entry = got[t]
        assert entry[ids[t]].logprob == pytest.approx(float(row[ids[t]]), abs=1e-3)
        assert entry[ids[t]].rank == int((row > row[ids[t]]).sum()) + 1
        top = [tid for tid, lp in entry.items() if lp.rank <= num]
        assert set(top) >= set(row.topk(num).indices.tolist()) - {ids[t]}
        assert len(entry) <= num + 1


def fillers(n):
    return [ENGLISH[: 20 + 37 * i % 700] + f" ({i})" for i in range(n)]


def test_greedy_matches_reference_alone(llm, parity_prompts, expected):
    for prompt, want in zip(parity_prompts, expected, strict=True):
        [out] = llm.generate(prompt, GREEDY, use_tqdm=False)
        assert out.outputs[0].token_ids == want, prompt[:40]


@pytest.mark.parametrize(
    "engine_args",
    [
        {"enable_prefix_caching": True},
        {"enable_prefix_caching": False},
        {"enable_prefix_caching": True, "max_num_batched_tokens": 64},  # forces chunked prefill
    ],
    ids=["prefix-cache", "no-prefix-cache", "chunked-prefill"],
)
def test_greedy_matches_reference_in_batch_of_64(
    engine_args, parity_prompts, expected, long_prompt_logprobs
):
    llm = LLM(dtype="float32", exact_matmul=True, kv_cache_memory=0.5, **engine_args)
    prompts = parity_prompts + fillers(64 - len(parity_prompts))
    params = [GREEDY] * len(prompts)
    params[3] = GREEDY.clone(prompt_logprobs=2)  # the long prompt, chunked in one case
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, want in zip(outs, expected, strict=False):
        assert out.outputs[0].token_ids == want
    check_prompt_logprobs(outs[3], *long_prompt_logprobs, num=2)
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outs)
    m = llm.get_metrics()
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


def test_kv_pressure_preempts_and_loses_nothing(parity_prompts, expected, llm):
    prompts = parity_prompts[:2] + fillers(14)
    calm = llm.generate(prompts, GREEDY, use_tqdm=False)
    tight = LLM(dtype="float32", exact_matmul=True, num_kv_blocks=48, max_num_batched_tokens=256)
    outs = tight.generate(prompts, GREEDY, use_tqdm=False)
    m = tight.get_metrics()
    assert m["num_preemptions_total"] > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in calm]
    assert outs[0].outputs[0].token_ids == expected[0]
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"] and m["num_requests_running"] == 0


def test_preemption_keeps_a_seeded_stream_and_drops_a_partial_pooling(llm):
    """A preempted request is recomputed later: its seeded random stream must go on
    where it was (restarting it would replay its first draws), while an embedding's
    partial sum over the chunks done so far is stale and starts over."""
    runner = llm.engine.runner
    runner._generators["x"] = torch.Generator().manual_seed(5)
    runner._pooled["x"] = torch.zeros(4)
    runner.execute(SchedulerOutput(preempted_req_ids=["x"]))
    assert "x" in runner._generators and "x" not in runner._pooled
    runner.release(["x"])
    assert "x" not in runner.live_request_ids()


def test_seeded_request_is_reproducible_anywhere(llm):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=24, seed=None)] * 31
    batch = (
        llm.generate(["Once upon a time", *fillers(31)], [params, *others], use_tqdm=False)[0]
        .outputs[0]
        .token_ids
    )
    other_engine = LLM(dtype="float32", exact_matmul=True, kv_cache_memory=0.25, seed=99)
    again = (
        other_engine.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0].token_ids
    )
    assert alone == batch == again
    unseeded = llm.generate("Once upon a time", params.clone(seed=4321), use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != alone


def test_sampling_parameters_take_effect(llm):
    """Each parameter changes the output as it should (all requests in one batch)."""
    prompt = "The capital of France is"
    short = GREEDY.clone(max_tokens=16)
    greedy = llm.generate(prompt, short, use_tqdm=False)[0].outputs[0]
    text = greedy.text
    stop = text[5:9]
    banned = greedy.token_ids[0]
    chat = [{"role": "user", "content": "Say hi."}]
    chat_ids = llm.get_tokenizer().encode_chat(chat)
    plain_chat = SamplingParams(temperature=0, max_tokens=48)
    cases = {
        "top_k=1": short.clone(temperature=1.0, top_k=1, seed=3),
        "bias": short.clone(logit_bias={banned: -100}),
        "stop": short.clone(stop=[stop]),
        "stop kept": short.clone(stop=[stop], include_stop_str_in_output=True),
    }
    outs = llm.generate(
        [prompt] * len(cases) + [{"prompt_token_ids": chat_ids}],
        [*cases.values(), plain_chat],
        use_tqdm=False,
    )
    got = dict(zip([*cases, "chat"], (o.outputs[0] for o in outs), strict=True))
    assert got["top_k=1"].token_ids == greedy.token_ids
    assert got["bias"].token_ids[0] != banned
    assert got["stop"].text == text[: text.index(stop)] and got["stop"].finish_reason == "stop"
    assert got["stop"].stop_reason == stop
    assert got["stop kept"].text == text[: text.index(stop) + len(stop)]
    # EOS comes early in a chat reply; min_tokens holds it off
    assert got["chat"].finish_reason == "stop" and len(got["chat"].token_ids) < 48
    n = len(got["chat"].token_ids)
    longer = llm.generate(
        {"prompt_token_ids": chat_ids}, plain_chat.clone(min_tokens=n + 5), use_tqdm=False
    )[0].outputs[0]
    assert len(longer.token_ids) >= n + 5


def test_logprobs_returned_per_token(llm):
    out = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=5, logprobs=3), use_tqdm=False
    )[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        assert all(lp.logprob <= 0 and lp.decoded_token is not None for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True))
    )


def test_prompt_logprobs_match_reference(llm, long_prompt_logprobs):
    ids, reference = long_prompt_logprobs
    params = SamplingParams(max_tokens=2, prompt_logprobs=5)
    [out] = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    check_prompt_logprobs(out, ids, reference, num=5)
    [again] = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert again.num_cached_tokens == 0  # scoring the prompt means computing all of it
    assert [e and e[i].logprob for e, i in zip(again.prompt_logprobs, ids, strict=True)] == [
        e and e[i].logprob for e, i in zip(out.prompt_logprobs, ids, strict=True)
    ]


def test_parallel_sampling_shares_prompt_blocks(llm, tokenizer):
    # random tokens: a high-entropy next-token distribution, so the 4 samples differ
    prompt_ids = torch.randint(
        100, 40000, (200,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    engine = llm.engine
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    engine.add_request("par", {"prompt_token_ids": prompt_ids}, params)
    manager = engine.scheduler.kv_cache_manager
    outputs, peak = [], 0
    while engine.has_unfinished_requests():
        outputs += engine.step()
        peak = max(peak, engine.num_blocks - manager.get_num_free_blocks())
    # 12 full prompt blocks held once, plus at most two own blocks per sample
    # (the copied partial block and one more); four private copies would need 56
    assert 13 <= peak <= 200 // 16 + 2 * 4, peak
    final = next(o for o in outputs if o.finished)
    assert len(final.outputs) == 4
    assert len({tuple(c.token_ids) for c in final.outputs}) == 4
    assert all(len(c.token_ids) == 16 for c in final.outputs)
    m = llm.get_metrics()
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


def test_prefix_cache_hit_on_shared_512_token_prefix(llm, tokenizer):
    prefix = tokenizer.encode(ENGLISH * 10)[:512]
    first = llm.generate({"prompt_token_ids": [*prefix, 11, 12]}, GREEDY, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": [*prefix, 11, 12]}, GREEDY, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 496
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_a_prefix_hit_answers_as_the_whole_prefill_did_on_the_fast_path():
    """The second time a conversation comes, a cache hit leaves only its last partial
    block to compute: a few rows. They must be computed as the whole prefill computed
    them (the norms that small batches once took in C differed by a rounding, which the
    int8 activations amplified: "The capital of France is Paris." became French)."""
    llm = LLM(kv_cache_memory=0.25, seed=0)  # the default fast path: int8 activations
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    params = SamplingParams(temperature=0, max_tokens=24)
    first = llm.chat(messages, params, use_tqdm=False)[0]
    second = llm.chat(messages, params, use_tqdm=False)[0]
    assert second.num_cached_tokens > 0 and first.num_cached_tokens == 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert "Paris" in first.outputs[0].text


def test_bad_input_is_refused_and_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        llm.generate("hi", SamplingParams(prompt_logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate("", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [1, 10**6]}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * 9000}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("hi", SamplingParams(max_tokens=10**6), use_tqdm=False)
    # a bad prompt in a list queues nothing; the engine still answers
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], GREEDY, use_tqdm=False)
    m = llm.get_metrics()
    assert m["num_requests_waiting"] == 0 and m["num_free_kv_blocks"] == m["num_kv_blocks"]
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_debug_invariants_stop_the_step_that_corrupted_a_ref_count(llm):
    engine = llm.engine
    engine.debug_invariants = True
    try:
        params = SamplingParams(temperature=0.8, max_tokens=4, n=2, seed=1)
        outs = llm.generate(["Paris is the capital of", "The quick brown fox"], params)
        assert all(len(c.token_ids) == 4 for o in outs for c in o.outputs)  # checked each step
        engine.add_request(engine.new_request_id(), "One two three", GREEDY)
        engine.step()
        pool = engine.scheduler.kv_cache_manager.block_pool
        held = next(b for b in pool.blocks if b.ref_cnt > 0)
        # A reference nobody holds: the next decode token copies the block it thinks
        # shared and the original is never freed.
        held.ref_cnt += 1
        with pytest.raises(InvariantError, match=r"has ref_cnt \d but is held by \d block tables"):
            engine.step()
        pool.free_blocks([held])  # drop the phantom reference: the block is free again
        engine.abort_request(list(engine.scheduler.requests))  # checks again
        assert not engine.has_unfinished_requests()
        engine.check_invariants()
    finally:
        engine.debug_invariants = False


def test_output_processing_failure_fails_only_that_request(llm, monkeypatch):
    """A detokenizer that raises for one prompt: that request ends with an error and
    frees its blocks, its batch mates finish normally."""
    from pagedllm.engine import detokenizer

    poisoned = llm.engine.tokenizer.encode("Tell me a poisoned story")
    real_update = detokenizer.IncrementalDetokenizer.update
    real_init = detokenizer.IncrementalDetokenizer.__init__

    def init(self, tokenizer, prompt_token_ids, params):
        real_init(self, tokenizer, prompt_token_ids, params)
        self.poisoned = list(prompt_token_ids) == poisoned

    def update(self, new_token_ids, **kwargs):
        if self.poisoned and len(self.output_token_ids) >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real_update(self, new_token_ids, **kwargs)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "__init__", init)
    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "update", update)
    engine = llm.engine
    engine.debug_invariants = True
    try:
        ids = {}
        for i, prompt in enumerate(["Paris is the capital of", poisoned, "1, 2, 3, 4,"]):
            ids[i] = engine.new_request_id()
            engine.add_request(ids[i], prompt, GREEDY)
        finals = {}
        while engine.has_unfinished_requests():
            finals |= {o.request_id: o for o in engine.step() if o.finished}
        assert "injected" in (finals[ids[1]].error or "")
        assert finals[ids[1]].outputs[0].finish_reason == "abort"
        for i in (0, 2):
            assert finals[ids[i]].error is None
            assert len(finals[ids[i]].outputs[0].token_ids) == NEW_TOKENS
        kv = engine.scheduler.kv_cache_manager
        assert kv.get_num_free_blocks() == kv.num_blocks
    finally:
        engine.debug_invariants = False


def test_parallel_sampling_with_max_tokens_1_ends_every_choice(llm):
    """Regression: n > 1 with max_tokens=1 failed the whole step (the scheduler refused
    to fork children that already had their one token), and every request with it."""
    llm.engine.debug_invariants = True
    try:
        one = SamplingParams(temperature=0.8, max_tokens=1, n=3, seed=3)
        outs = llm.generate(["Paris is the capital of", "The quick brown fox"], [one, GREEDY])
    finally:
        llm.engine.debug_invariants = False
    assert [len(c.token_ids) for c in outs[0].outputs] == [1, 1, 1]
    assert {c.finish_reason for c in outs[0].outputs} == {"length"}
    assert len(outs[1].outputs[0].token_ids) == NEW_TOKENS
