"""Structured output: which tokens a request's constraint allows next, as a bitmask.

The grammar engine is llguidance (measured against xgrammar in BENCHMARKS.md, "Issue 16:
token masks"): it compiles JSON schemas, regular expressions and Lark/GBNF grammars
lazily, computes a step's mask in tens of microseconds, and needs nothing beside its
wheel. Compiled grammars are cached by the constraint's text; each request gets a copy of
the compiled matcher and advances it with the tokens it has output, lazily, right before
its next mask, so forks (n > 1, beams) and preempted requests need nothing of their own:
a matcher never seen is a copy advanced by the request's whole output.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from pagedllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256
# Whitespace between JSON tokens: one space, or a line break or two and an indent of at
# most 20 (llama.cpp's rule). Unbounded whitespace lets a model loop on newlines forever.
JSON_OPTIONS = {"whitespace_pattern": r"(?:\x20|\x0A{1,2}[\x20\x09]{0,20})"}
_BIT_POSITIONS = torch.arange(32, dtype=torch.int32)


def grammar_text(params: StructuredOutputsParams) -> str:
    """The constraint as an llguidance grammar (not yet checked)."""
    import llguidance

    matcher = llguidance.LLMatcher
    if params.json is not None:
        return matcher.grammar_from_json_schema(params.json, defaults=JSON_OPTIONS)
    if params.json_object:
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if params.regex is not None:
        return matcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        # Lark string literals take JSON's escapes
        return matcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        )
    assert params.grammar is not None
    from llguidance.gbnf_to_lark import any_to_lark

    return matcher.grammar_from_lark(any_to_lark(params.grammar))


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary, and caches the results."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos_token_ids = [t for t in eos_token_ids if t is not None]
        self._tokenizer: Any = None  # built on first use: ~1 s for a 49k vocabulary
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()  # the engine thread compiles, the mask thread copies

    def _ll_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(
                self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids
            )
        return self._tokenizer

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled matcher of a constraint, at its start (shared: copy it before use).

        Raises ValueError naming the problem for a constraint that does not compile.
        """
        import llguidance

        key = params.key
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        try:
            text = grammar_text(params)
        except Exception as e:  # the converters' own parse errors, whatever their class
            raise ValueError(f"structured_outputs does not compile: {e}") from None
        matcher = llguidance.LLMatcher(self._ll_tokenizer(), text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs does not compile: {matcher.get_error()}")
        with self._lock:
            self._compiled[key] = matcher
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def new_matcher(self, params: StructuredOutputsParams) -> Any:
        """A matcher of its own for one request, at the constraint's start."""
        return self.compile(params).deep_copy()


class GrammarMatchers:
    """Each constrained request's matcher, advanced by its output before each mask."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._matchers: dict[str, tuple[Any, int]] = {}  # request id -> (matcher, consumed)

    def fill(
        self,
        requests: Sequence[tuple[str, StructuredOutputsParams, Sequence[int]]],
    ) -> torch.Tensor:
        """Bitmasks [len(requests), ceil(V / 32)] int32 of the tokens each (request id,
        constraint, output tokens so far) allows next."""
        import llguidance.torch

        words = -(-self.compiler.vocab_size // 32)
        bitmask = torch.full((len(requests), words), -1, dtype=torch.int32)
        for row, (request_id, params, output) in enumerate(requests):
            matcher = self._advanced(request_id, params, output)
            if matcher is None:
                continue  # lost its constraint: every token stays allowed
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)
        return bitmask

    def _advanced(
        self, request_id: str, params: StructuredOutputsParams, output: Sequence[int]
    ) -> Any:
        state = self._matchers.get(request_id)
        if state is None:
            state = (self.compiler.new_matcher(params), 0)
        matcher, consumed = state
        if matcher is None:
            return None
        if consumed < len(output):
            stopped = matcher.is_stopped()  # done, yet the request goes on: ignore_eos
            if stopped or not matcher.consume_tokens(list(output[consumed:])):
                if not stopped:  # only tokens the mask allowed are sampled: a bug
                    error = matcher.get_error().splitlines()[:1]
                    logger.warning("request %s left its structured output: %s", request_id, error)
                self._matchers[request_id] = (None, len(output))
                return None
        self._matchers[request_id] = (matcher, len(output))
        return matcher

    def release(self, request_ids: Sequence[str] | set[str]) -> None:
        for request_id in request_ids:
            self._matchers.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, the logits [B, V] of tokens the bitmask [B, ceil(V/32)]
    forbids (bit t % 32 of word t // 32 clear)."""
    vocab = logits.shape[1]
    bits = (bitmask.to(logits.device).unsqueeze(-1) >> _BIT_POSITIONS.to(logits.device)) & 1
    allowed = bits.flatten(1)[:, :vocab].bool()
    return logits.masked_fill_(~allowed, float("-inf"))
