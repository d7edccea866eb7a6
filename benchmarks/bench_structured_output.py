"""Structured output on the default model: how often the output validates, and what the
token masks cost.

1. Validity: 200 chat requests over 10 JSON schemas (nested objects, arrays with bounds,
   enums, numbers with ranges, required and optional fields, $ref), temperature 0.8,
   each seeded; the share whose text parses and validates with `jsonschema`.
2. Overhead: 32 concurrent requests of 128 new tokens (ignore_eos), greedy, decoded
   together with a JSON-schema constraint (an array of at least 100 numbers: constrained
   at every step) and without; wall time, as a ratio.
3. Mask fill alone: llguidance against xgrammar at vocabulary 49,152 and batch 32, when
   xgrammar is importable (it is not a dependency: `pip install xgrammar` to compare).

Usage: python benchmarks/bench_structured_output.py [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jsonschema
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.sample.grammar import apply_token_bitmask

POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "number", "minimum": -100, "maximum": 100},
        "y": {"type": "number", "minimum": -100, "maximum": 100},
    },
    "required": ["x", "y"],
    "additionalProperties": False,
}
SCHEMAS: list[dict] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        },
        "required": ["title", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "angry", "calm"]}},
        "required": ["mood"],
        "additionalProperties": False,
    },
    {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "population": {"type": "integer", "minimum": 0, "maximum": 40_000_000},
            "capital": {"type": "boolean"},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 99999},
                    "email": {"type": "string", "maxLength": 40},
                },
                "required": ["id"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 100},
        "minItems": 2,
        "maxItems": 6,
    },
    {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "verdict": {"enum": ["pass", "fail"]},
            "comment": {"type": "string", "maxLength": 50},
        },
        "required": ["score", "verdict"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "n": {"type": "integer", "minimum": 1, "maximum": 9},
                        "text": {"type": "string", "maxLength": 30},
                    },
                    "required": ["n", "text"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["steps"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "rgb": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 255},
                "minItems": 3,
                "maxItems": 3,
            },
        },
        "required": ["color", "rgb"],
        "additionalProperties": False,
    },
]
PROMPTS = [
    "Describe a person as JSON.",
    "Give a blog post title and tags as JSON.",
    "How do you feel? Answer as JSON.",
    "Give a line segment as JSON.",
    "Describe a city as JSON.",
    "Describe a user account as JSON.",
    "List a few numbers as JSON.",
    "Review a movie as JSON.",
    "Explain how to boil an egg as JSON.",
    "Pick a color as JSON.",
]


def validity(llm: LLM, num_requests: int) -> None:
    conversations, params, schemas = [], [], []
    for i in range(num_requests):
        k = i % len(SCHEMAS)
        conversations.append([{"role": "user", "content": PROMPTS[k]}])
        schemas.append(SCHEMAS[k])
        params.append(
            SamplingParams(
                temperature=0.8, seed=i, max_tokens=256, structured_outputs={"json": SCHEMAS[k]}
            )
        )
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    valid, lengths = 0, []
    for out, schema in zip(outputs, schemas, strict=True):
        completion = out.outputs[0]
        lengths.append(len(completion.token_ids))
        try:
            jsonschema.validate(json.loads(completion.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            print(f"  invalid ({completion.finish_reason}): {completion.text[:120]!r}")
    print(
        f"validity: {valid}/{num_requests} parse and validate "
        f"({len(SCHEMAS)} schemas, temperature 0.8), {sum(lengths)} tokens in {elapsed:.1f} s, "
        f"median {statistics.median(lengths)} tokens per answer"
    )


def overhead(llm: LLM) -> None:
    # at least 100 items: more than 128 tokens, so the mask works at every step
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 100},
        "minItems": 100,
    }
    conversation = [{"role": "user", "content": "List numbers as JSON."}]
    times = {}
    for name, constraint in (("unconstrained", None), ("json schema", {"json": schema})):
        params = SamplingParams(
            temperature=0, max_tokens=128, ignore_eos=True, structured_outputs=constraint
        )
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            llm.chat([conversation] * 32, params, use_tqdm=False)
            best = min(best, time.perf_counter() - start)
        times[name] = best
        print(f"overhead: 32 x 128 tokens {name}: {best:.2f} s")
    ratio = times["json schema"] / times["unconstrained"]
    print(f"overhead: constrained / unconstrained = {ratio:.3f}")


def mask_fill(llm: LLM) -> None:
    tokenizer = llm.engine.tokenizer
    vocab = llm.engine.model_config.vocab_size
    schema = SCHEMAS[5]
    text = '{"user": {"id": 4211, "email": "ann@example.com"}, "active": true}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(32)]
    engines = {
        "llguidance": (
            lambda m, mask, i: llguidance.torch.fill_next_token_bitmask(m, mask, i),
            lambda m, t: m.consume_token(t),
            matchers,
        )
    }
    try:
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer.hf, vocab_size=vocab)
        compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(schema))
        engines["xgrammar"] = (
            lambda m, mask, i: m.fill_next_token_bitmask(mask, i),
            lambda m, t: m.accept_token(t),
            [xgrammar.GrammarMatcher(compiled) for _ in range(32)],
        )
    except ImportError:
        print("mask fill: xgrammar not installed, llguidance alone")
    for name, (fill, accept, ms) in engines.items():
        mask = torch.full((32, -(-vocab // 32)), -1, dtype=torch.int32)
        fills, applies = [], []
        logits = torch.randn(32, vocab)
        for token in ids:
            start = time.perf_counter()
            for i, m in enumerate(ms):
                fill(m, mask, i)
            mid = time.perf_counter()
            apply_token_bitmask(logits, mask)
            applies.append(time.perf_counter() - mid)
            fills.append(mid - start)
            for m in ms:
                assert accept(m, token)
        print(
            f"mask fill: {name}: batch 32, vocab {vocab}: fill median "
            f"{statistics.median(fills[1:]) * 1e3:.2f} ms (first {fills[0] * 1e3:.1f} ms), "
            f"apply median {statistics.median(applies) * 1e3:.2f} ms, over {len(ids)} steps"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    )
    llm = LLM()
    mask_fill(llm)
    validity(llm, args.requests)
    overhead(llm)


if __name__ == "__main__":
    main()
