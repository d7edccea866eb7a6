"""Speculative decoding with a draft model, on the default model: the model drafting for
itself accepts every draft on the exact path (its KV follows the target's tables step by
step), a random draft that is always wrong changes nothing, and the draft's bookkeeping
survives chunked prefill, prefix hits, n > 1, preemption and aborts without a leak."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import ENGLISH
from tests.engine.test_spec_decode import (
    COPY,
    DEFAULT_MODEL,
    PROMPTS,
    tokens,
)
from tests.model.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.slow

SELF_DRAFT = {"method": "draft_model", "model": DEFAULT_MODEL}
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# 64 prompts of 15 to 90 tokens, some sharing a prefix (prefix-cache hits)
MANY = PROMPTS + [ENGLISH[i : i + 60 + 4 * i] for i in range(0, 180, 3)]


@pytest.fixture(autouse=True)
def check_invariants(monkeypatch):
    """Every step re-checks the blocks and that no finished request keeps draft state."""
    monkeypatch.setenv("PAGEDLLM_DEBUG_INVARIANTS", "1")


@pytest.fixture(scope="module")
def exact_plain():
    return LLM(seed=0, exact_matmul=True)


def accepted_and_drafted(llm: LLM) -> tuple[int, int]:
    m = llm.get_metrics()
    return m["spec_decode_num_accepted_tokens"], m["spec_decode_num_draft_tokens"]


def test_the_model_drafting_for_itself_is_always_accepted(exact_plain):
    """On the exact path the draft computes every position with the target's kernels and
    the target's KV layout: any rejected draft is a bookkeeping bug (a stale, missing or
    misplaced draft KV entry)."""
    spec = LLM(seed=0, exact_matmul=True, speculative_config=SELF_DRAFT)
    for prompt in MANY[:6]:
        assert tokens(spec, [prompt], GREEDY) == tokens(exact_plain, [prompt], GREEDY)
    assert tokens(spec, MANY, GREEDY) == tokens(exact_plain, MANY, GREEDY)
    accepted, drafted = accepted_and_drafted(spec)
    assert drafted > 64 * 3 and accepted == drafted
    m = spec.get_metrics()
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


def test_chunked_prefill_prefix_hits_n_and_preemption_keep_full_acceptance(exact_plain):
    tight = LLM(
        seed=0,
        exact_matmul=True,
        num_kv_blocks=16,  # 8 requests of ~6 blocks: preempted and resumed
        max_num_batched_tokens=32,  # the prompts are prefilled in chunks
        speculative_config=SELF_DRAFT,
    )
    prompts = [COPY[i * 7 :] for i in range(6)] + [COPY[:200], COPY[:200] + " and"]
    assert tokens(tight, prompts, GREEDY) == tokens(exact_plain, prompts, GREEDY)
    [out] = tight.generate(COPY[:300], GREEDY.clone(n=3), use_tqdm=False)
    [single] = tokens(exact_plain, [COPY[:300]], GREEDY)
    assert [c.token_ids for c in out.outputs] == [single] * 3
    m = tight.get_metrics()
    assert m["num_preemptions_total"] > 0 and m["prefix_cache_hits"] > 0
    accepted, drafted = accepted_and_drafted(tight)
    assert drafted > 0 and accepted == drafted
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"] and m["num_requests_running"] == 0


def test_default_path_self_draft_matches_plain_decoding_alone():
    """The int8 kernels round a row by its batch's size, so the draft's prompt chunk
    and the target's differ in the last bits: most drafts still stand, and what is
    emitted is always the target's."""
    plain, spec = LLM(seed=0), LLM(seed=0, speculative_config=SELF_DRAFT)
    for prompt in PROMPTS:
        assert tokens(spec, [prompt], GREEDY) == tokens(plain, [prompt], GREEDY)
    accepted, drafted = accepted_and_drafted(spec)
    assert accepted > 0.8 * drafted


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory):
    """A 2-layer random Llama with the default model's vocabulary: its drafts miss."""
    path = tmp_path_factory.mktemp("draft") / "random-draft.gguf"
    return str(write_tiny_gguf(path, vocab=49152))


def test_a_draft_that_always_misses_changes_no_token_and_backs_off(random_draft, exact_plain):
    spec = LLM(
        seed=0,
        exact_matmul=True,
        max_model_len=256,  # the random draft's context
        speculative_config={"method": "draft_model", "model": random_draft},
    )
    long = GREEDY.clone(max_tokens=64)
    assert tokens(spec, PROMPTS, long) == tokens(exact_plain, PROMPTS, long)
    accepted, drafted = accepted_and_drafted(spec)
    steps = spec.get_metrics()["spec_decode_num_drafts"]
    assert accepted < 0.2 * drafted
    assert steps < len(PROMPTS) * 64 / 3  # rejected drafts back off


def test_abort_mid_speculation_frees_everything():
    spec = LLM(seed=0, speculative_config=SELF_DRAFT)
    engine = spec.engine
    engine.add_request("a", COPY, GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.proposer.live_request_ids() >= {"a", "b"}
    engine.abort_request(["a", "b"])
    assert not engine.proposer.live_request_ids()
    m = spec.get_metrics()
    assert m["num_free_kv_blocks"] == m["num_kv_blocks"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "draft_model"}, 'needs "model"'),
        ({"method": "ngram", "model": "x.gguf"}, 'needs "model"'),
        ({"method": "draft_model", "model": "/no/such/draft.gguf"}, "draft.gguf"),
    ],
)
def test_bad_draft_configs_are_named(config, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        LLM(speculative_config=config)


def test_a_draft_with_another_vocabulary_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "small-vocab.gguf")
    config = {"method": "draft_model", "model": str(path)}
    with pytest.raises(ValueError, match="vocabulary of 100 tokens but the target's has 49152"):
        LLM(max_model_len=256, speculative_config=config)
    with pytest.raises(ValueError, match=r"small-vocab\.gguf"):
        LLM(speculative_config=config)  # 8192 tokens: past the draft's context
