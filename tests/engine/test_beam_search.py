"""LLM.beam_search against a plain beam search over the transformers reference model.

The reference runs transformers' model in float32, reordering its KV cache to the
surviving beams each step, with the same rule as the engine (vLLM's): each beam offers its top 2 * beam_width
tokens, EOS candidates finish, the best beam_width others by cumulative logprob
live on; finished beams rank by cum_logprob / generated_length ** length_penalty.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.request import RequestStatus
from pagedllm.sampling_params import BeamSearchParams
from tests.conftest import ENGLISH

pytestmark = pytest.mark.slow

BEAM_WIDTH = 4
MAX_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of a few decode rows gain nothing from intra-op threads, and on a shared
    CPU their barriers made this module 6x slower (230 s against 37 s on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llm():
    from pagedllm import LLM

    return LLM(dtype="float32", exact_matmul=True, num_kv_blocks=256, max_model_len=512)


@torch.no_grad()
def reference_beam_search(
    model, prompt_ids, eos, beam_width, max_tokens, length_penalty, ignore_eos
):
    """[(tokens, cum_logprob, score)] best first; the live beams' KV reordered each step."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    live = [([], 0.0)]
    finished = []
    for step in range(max_tokens):
        logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        top = logprobs.topk(2 * beam_width, dim=-1)
        growing = []  # (tokens, cum_logprob, parent)
        for parent, ((tokens, cum), values, indices) in enumerate(
            zip(live, top.values.tolist(), top.indices.tolist(), strict=True)
        ):
            for logprob, token in zip(values, indices, strict=True):
                if token == eos and not ignore_eos:
                    finished.append(([*tokens, token], cum + logprob))
                else:
                    growing.append(([*tokens, token], cum + logprob, parent))
        growing.sort(key=lambda b: b[1], reverse=True)
        growing = growing[:beam_width]
        live = [(tokens, cum) for tokens, cum, _ in growing]
        if not live or step == max_tokens - 1:
            break
        out.past_key_values.reorder_cache(torch.tensor([parent for *_, parent in growing]))
        next_ids = torch.tensor([[tokens[-1]] for tokens, _ in live])
        out = model(next_ids, past_key_values=out.past_key_values, use_cache=True)
    finished += live

    def score(tokens, cum):
        length = len(tokens) - (1 if tokens[-1] == eos and not ignore_eos else 0)
        return cum / max(1, length) ** length_penalty

    ranked = sorted(((t, c, score(t, c)) for t, c in finished), key=lambda b: b[2], reverse=True)
    return ranked[:beam_width]


def spy_on_scheduler(llm, monkeypatch):
    """Record the peak of used KV blocks after each schedule(), aborts and forks."""
    scheduler = llm.engine.scheduler
    seen = {"peak": 0, "aborted": [], "forked": []}
    schedule, finish, fork = scheduler.schedule, scheduler.finish_requests, scheduler.fork_request

    def spy_schedule():
        out = schedule()
        kv = scheduler.kv_cache_manager
        seen["peak"] = max(seen["peak"], kv.num_blocks - kv.get_num_free_blocks())
        return out

    def spy_finish(ids, status):
        if status is RequestStatus.FINISHED_ABORTED:
            seen["aborted"].extend([ids] if isinstance(ids, str) else ids)
        return finish(ids, status)

    def spy_fork(parent_id, children):
        seen["forked"].extend(c.request_id for c in children)
        return fork(parent_id, children)

    monkeypatch.setattr(scheduler, "schedule", spy_schedule)
    monkeypatch.setattr(scheduler, "finish_requests", spy_finish)
    monkeypatch.setattr(scheduler, "fork_request", spy_fork)
    return seen


def assert_no_block_leaked(llm):
    metrics = llm.get_metrics()
    assert metrics["num_free_kv_blocks"] == metrics["num_kv_blocks"]
    assert not llm.engine.has_unfinished_requests()
    llm.engine.scheduler.check_invariants()


def assert_matches_reference(output, reference):
    got = [(s.tokens, s.cum_logprob, s.score) for s in output.sequences]
    assert [g[0] for g in got] == [r[0] for r in reference]
    for (_, cum, score), (_, ref_cum, ref_score) in zip(got, reference, strict=True):
        assert cum == pytest.approx(ref_cum, abs=1e-3)
        assert score == pytest.approx(ref_score, abs=1e-3)
    scores = [s.score for s in output.sequences]
    assert scores == sorted(scores, reverse=True)


def test_beam_search_matches_reference_and_shares_blocks(llm, hf_reference, monkeypatch):
    params = BeamSearchParams(BEAM_WIDTH, MAX_TOKENS, length_penalty=1.0, ignore_eos=True)
    prompts = ["The capital of France is", ENGLISH]
    seen = spy_on_scheduler(llm, monkeypatch)
    before = llm.get_metrics()
    outputs = llm.beam_search(prompts, params)
    assert_no_block_leaked(llm)
    after = llm.get_metrics()
    # every prompt computed once at least; every live beam samples one token per step
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] >= prompt_tokens
    generated = after["generation_tokens_total"] - before["generation_tokens_total"]
    assert len(prompts) * MAX_TOKENS <= generated <= len(prompts) * BEAM_WIDTH * MAX_TOKENS

    eos = llm.get_tokenizer().eos_token_id
    block_size = llm.engine.args.block_size
    for output in outputs:
        assert len(output.sequences) == BEAM_WIDTH
        assert all(len(s.tokens) == MAX_TOKENS for s in output.sequences)
        assert all(s.finish_reason == "length" for s in output.sequences)
        assert output.sequences[0].text == llm.get_tokenizer().decode(output.sequences[0].tokens)
        reference = reference_beam_search(
            hf_reference, output.prompt_token_ids, eos, BEAM_WIDTH, MAX_TOKENS, 1.0, True
        )
        assert_matches_reference(output, reference)

    # Beams share their prompt's full blocks: each holds at most the block where its
    # prompt ends (copied on write) and one more for its 16 tokens.
    prompt_lens = [len(o.prompt_token_ids) for o in outputs]
    shared_bound = sum(n // block_size + 2 * BEAM_WIDTH for n in prompt_lens)
    unshared = sum(BEAM_WIDTH * -(-(n + MAX_TOKENS) // block_size) for n in prompt_lens)
    assert seen["peak"] <= shared_bound < unshared
    assert max(prompt_lens) // block_size >= 4  # enough prompt blocks for sharing to show
    # Extra survivors were forked (the first step alone forks beam_width - 1 per
    # prompt), pruned beams aborted, and every beam ends aborted with the search.
    assert len(seen["forked"]) >= 2 * (BEAM_WIDTH - 1)
    assert set(seen["forked"]) <= set(seen["aborted"])


def test_beam_search_with_eos_and_length_penalty_matches_reference(llm, hf_reference):
    tokenizer = llm.get_tokenizer()
    eos = tokenizer.eos_token_id
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], True)
    prompt_ids = tokenizer.encode(chat, add_special_tokens=False)
    params = BeamSearchParams(BEAM_WIDTH, MAX_TOKENS, length_penalty=0.5, ignore_eos=False)
    (output,) = llm.beam_search({"prompt_token_ids": prompt_ids}, params)
    assert_no_block_leaked(llm)

    assert output.prompt_token_ids == prompt_ids
    # The EOS path is exercised: a beam that ended on EOS, shorter than the rest.
    stopped = [s for s in output.sequences if s.finish_reason == "stop"]
    assert stopped and all(s.tokens[-1] == eos for s in stopped)
    assert all(len(s.tokens) < MAX_TOKENS for s in stopped)
    reference = reference_beam_search(
        hf_reference, prompt_ids, eos, BEAM_WIDTH, MAX_TOKENS, 0.5, False
    )
    assert_matches_reference(output, reference)


def test_bad_prompt_is_refused_before_anything_runs(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.beam_search(["fine", ""], BeamSearchParams(2, 4))
    assert_no_block_leaked(llm)


def test_beam_search_shares_the_engine_step_with_other_requests(llm, monkeypatch):
    """A search runs in the same continuous batch as plain requests (no loop of its own,
    no idle engine needed) and neither changes the other's tokens."""
    from pagedllm import SamplingParams

    params = BeamSearchParams(BEAM_WIDTH, 8, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    texts = ["Once upon a time", "The best way to learn is"]
    (alone,) = llm.beam_search(["The capital of France is"], params)
    plain = [o.outputs[0].token_ids for o in llm.generate(texts, greedy, use_tqdm=False)]

    engine = llm.engine
    scheduled = []
    schedule = engine.scheduler.schedule

    def spy_schedule():
        out = schedule()
        scheduled.append({s.request_id.split("#")[0] for s in out.scheduled_requests})
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", spy_schedule)
    engine.add_request("plain0", texts[0], greedy)
    engine.add_request("search", "The capital of France is", params)
    engine.add_request("plain1", texts[1], greedy)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("search", "again", params)
    finished = {}
    while engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    assert any({"search", "plain0", "plain1"} <= ids for ids in scheduled)
    assert [c.token_ids for c in finished["search"].outputs] == [s.tokens for s in alone.sequences]
    assert [finished[f"plain{i}"].outputs[0].token_ids for i in range(2)] == plain
    assert_no_block_leaked(llm)


def test_aborting_a_search_midway_frees_its_beams(llm):
    engine = llm.engine
    engine.add_request("search", ENGLISH, BeamSearchParams(BEAM_WIDTH, 32))
    for _ in range(4):
        assert engine.step() == []  # nothing until the search ends
    assert len(engine.beams.live_request_ids()) == BEAM_WIDTH
    (output,) = engine.abort_request("search")
    assert output.finished and output.outputs == []
    assert_no_block_leaked(llm)
    assert not engine.beams.live_request_ids()
