"""Structured output's token masks: exactly the tokens a constraint allows, applied per
row in the sampler, advanced by each request's own output."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pagedllm.sample.grammar import GrammarCompiler, GrammarMatchers, apply_token_bitmask
from pagedllm.sample.metadata import RowSamplingState, SamplingMetadata
from pagedllm.sample.sampler import Sampler
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer.hf, tokenizer.vocab_size, [tokenizer.eos_token_id])


def allowed(bitmask_row: torch.Tensor, vocab: int) -> set[int]:
    logits = torch.zeros(1, vocab)
    apply_token_bitmask(logits, bitmask_row.unsqueeze(0))
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_bitmask_forbids_exactly_the_cleared_bits():
    vocab = 70  # three words, the last partly used
    wanted = {0, 5, 31, 32, 63, 64, 69}
    words = torch.zeros(1, 3, dtype=torch.int64)
    for t in wanted:
        words[0, t // 32] |= 1 << (t % 32)
    bitmask = words.to(torch.int32)  # bit 31 wraps to the sign, as int32 stores it
    logits = torch.randn(1, vocab)
    before = logits.clone()
    apply_token_bitmask(logits, bitmask)
    kept = torch.isfinite(logits[0])
    assert set(torch.nonzero(kept).flatten().tolist()) == wanted
    assert torch.equal(logits[0, kept], before[0, kept])


def test_choice_allows_only_the_first_tokens_of_the_choices(compiler, tokenizer):
    params = StructuredOutputsParams(choice=["Paris", "London"])
    matchers = GrammarMatchers(compiler)
    [row] = matchers.fill([("r", params, [])])
    ok = allowed(row, compiler.vocab_size)
    texts = {tokenizer.decode([t]) for t in ok}
    assert ok and all("Paris".startswith(t) or "London".startswith(t) for t in texts)
    assert tokenizer.encode("Paris", add_special_tokens=False)[0] in ok
    assert tokenizer.encode("London", add_special_tokens=False)[0] in ok
    # after "London", only the end of the text
    london = tokenizer.encode("London", add_special_tokens=False)
    [row] = matchers.fill([("r", params, london)])
    assert allowed(row, compiler.vocab_size) == {tokenizer.eos_token_id}


def test_matchers_advance_lazily_and_forks_replay_their_output(compiler, tokenizer):
    params = StructuredOutputsParams(regex=r"[0-9]{3}")
    matchers = GrammarMatchers(compiler)
    digits = tokenizer.encode("12", add_special_tokens=False)
    a, b = matchers.fill([("a", params, digits), ("fork", params, digits)])
    assert torch.equal(a, b)
    ok = allowed(a, compiler.vocab_size)
    assert ok and all(re.fullmatch("[0-9]", tokenizer.decode([t])) for t in ok)
    matchers.release(["a", "fork"])
    assert "a" not in matchers


def test_greedy_sampling_under_a_mask_follows_the_schema(compiler, tokenizer):
    """A random 'model' constrained by a schema still writes valid JSON."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    params = SamplingParams(temperature=0, structured_outputs={"json": schema})
    matchers = GrammarMatchers(compiler)
    generator = torch.Generator().manual_seed(0)
    output: list[int] = []
    for _ in range(200):
        [mask] = matchers.fill([("r", params.structured_outputs, output)])
        meta = SamplingMetadata.from_requests([RowSamplingState(params)], compiler.vocab_size)
        meta.allowed_bitmask = mask.unsqueeze(0)
        logits = torch.randn(1, compiler.vocab_size, generator=generator)
        token = Sampler()(logits, meta).sampled_token_ids.item()
        if token == tokenizer.eos_token_id:
            break
        output.append(token)
    value = json.loads(tokenizer.decode(output))
    assert set(value) == {"n", "ok"} and isinstance(value["n"], int)


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        ({"regex": "(unclosed"}, "does not compile"),
        ({"grammar": "start: undefined_rule"}, "does not compile"),
        ({"json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "structured"),
    ],
)
def test_bad_constraints_are_refused_with_the_reason(compiler, constraint, message):
    with pytest.raises(ValueError, match=message):
        compiler.compile(StructuredOutputsParams(**constraint))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one of"),
        ({"regex": "a", "choice": ["b"]}, "exactly one of"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"choice": ["a", ""]}, "non-empty strings"),
        ({"json_object": False, "regex": "a"}, "json_object must be true"),
    ],
)
def test_structured_outputs_params_are_validated(fields, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**fields)


def test_gbnf_grammars_are_accepted(compiler, tokenizer):
    gbnf = 'root ::= "yes" | "no"'
    matchers = GrammarMatchers(compiler)
    [row] = matchers.fill([("r", StructuredOutputsParams(grammar=gbnf), [])])
    texts = {tokenizer.decode([t]) for t in allowed(row, compiler.vocab_size)}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts)
