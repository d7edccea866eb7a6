"""Sampling parameters for one request, validated at construction.

Mirrors vLLM's ``SamplingParams``: every field a user may set is checked once,
here, with an error naming the field and the value, so the engine can trust it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5
# The range torch.Generator.manual_seed accepts; larger seeds would crash the engine.
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1
# Bounds on the fields whose cost is paid for every row of every step (the sampler
# walks stop_token_ids and logit_bias; the detokenizer scans each stop string), so
# one request cannot make every step slow. OpenAI allows 4 stop strings and 300
# logit_bias entries; vLLM sets no bound.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 300
# Bounds on a structured-output constraint: compiling one costs time on the engine's thread.
MAX_GRAMMAR_CHARS = 100_000
MAX_CHOICES = 1024


@dataclass
class StructuredOutputsParams:
    """A constraint on the output's text, as vLLM names them: exactly one of a JSON
    schema, any JSON object, a regular expression, a choice among strings, or a grammar
    (Lark/EBNF, or llama.cpp's GBNF, told apart by its ``::=``)."""

    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        set_fields = list(self._set_fields())
        if len(set_fields) != 1:
            names = ", ".join(self.__dataclass_fields__)
            raise ValueError(
                f"structured_outputs takes exactly one of {names}; got "
                f"{', '.join(set_fields) or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError(
                f"structured_outputs.json must be a JSON schema object, got {self.json!r}"
            )
        if self.json_object is not None and self.json_object is not True:
            raise ValueError("structured_outputs.json_object must be true")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {value!r}")
        if self.choice is not None:
            if not isinstance(self.choice, list | tuple) or not all(
                isinstance(c, str) and c for c in self.choice
            ):
                raise ValueError("structured_outputs.choice must be a list of non-empty strings")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(
                    f"structured_outputs.choice may list at most {MAX_CHOICES} strings"
                )
            self.choice = list(self.choice)
        if len(self.key) > MAX_GRAMMAR_CHARS:
            raise ValueError(
                f"structured_outputs is {len(self.key)} characters long; at most "
                f"{MAX_GRAMMAR_CHARS} are compiled"
            )

    def _set_fields(self) -> dict[str, Any]:
        return {
            name: value
            for name in self.__dataclass_fields__
            if (value := getattr(self, name)) is not None and value is not False
        }

    @property
    def key(self) -> str:
        """A canonical text of the constraint: equal keys compile to the same grammar."""
        return json.dumps(self._set_fields(), sort_keys=True)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # a constraint on the output text (a JSON schema, regex, choice or grammar)
    structured_outputs: StructuredOutputsParams | None = None
    # where a KV connector finds the prompt's KV (a decode instance: the prefill
    # instance's address, as its response's kv_transfer_params gave it)
    kv_transfer_params: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list("stop", self.stop, MAX_STOP_STRINGS)
        self.stop_token_ids = _as_list("stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS)
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None:
            self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if self.kv_transfer_params is not None and not (
            isinstance(self.kv_transfer_params, dict)
            and all(isinstance(k, str) for k in self.kv_transfer_params)
        ):
            raise ValueError(
                f"kv_transfer_params must be a JSON object, got {self.kv_transfer_params!r}"
            )
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, minimum=1)
        _check_number("temperature", self.temperature, minimum=0.0)
        _check_number("top_p", self.top_p, minimum=0.0, maximum=1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1], got 0.0")
        _check_int("top_k", self.top_k)
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        _check_number("min_p", self.min_p, minimum=0.0, maximum=1.0)
        _check_number("repetition_penalty", self.repetition_penalty, minimum=0.0)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be > 0, got 0.0")
        _check_number("presence_penalty", self.presence_penalty, minimum=-2.0, maximum=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, minimum=-2.0, maximum=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=_SEED_MIN, maximum=_SEED_MAX)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_int("min_tokens", self.min_tokens, minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                f"and max_tokens={self.max_tokens}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must contain non-empty strings, got {s!r}")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(
                    f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, "
                    f"got one of {len(s)}"
                )
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, minimum=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, minimum=0, maximum=20)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, minimum=0, maximum=20)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if self.logit_bias is not None:
            for token_id, bias in self.logit_bias.items():
                _check_int("logit_bias", token_id, minimum=0)
                _check_number("logit_bias", bias, minimum=-100.0, maximum=100.0)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise ValueError(
                f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}"
            )

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature < _GREEDY_EPS

    def within_vocabulary(self, vocab_size: int) -> SamplingParams:
        """These params without logit_bias entries or stop ids past the vocabulary.

        Such ids can never be sampled, so they would only cost time in every step.
        """
        bias = self.logit_bias
        if bias is not None and any(t >= vocab_size for t in bias):
            bias = {t: v for t, v in bias.items() if t < vocab_size}
        stop_ids = self.stop_token_ids
        if any(t >= vocab_size for t in stop_ids):
            stop_ids = [t for t in stop_ids if t < vocab_size]
        if bias is self.logit_bias and stop_ids is self.stop_token_ids:
            return self
        return self.clone(logit_bias=bias, stop_token_ids=stop_ids)

    def clone(self, **changes: object) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        values.update(changes)
        return SamplingParams(**values)  # type: ignore[arg-type]


@dataclass
class BeamSearchParams:
    """Parameters of a beam search (``LLM.beam_search``, or ``use_beam_search`` over HTTP)."""

    beam_width: int
    max_tokens: int | None  # None: up to the model's context
    length_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, minimum=1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1)
        _check_number("length_penalty", self.length_penalty)


def _as_list(name: str, value: object, max_items: int) -> list:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise ValueError(f"{name} must be a list, got {value!r}")
    if len(value) > max_items:
        raise ValueError(f"{name} may have at most {max_items} entries, got {len(value)}")
    return list(value)


def _normalize_logit_bias(value: object) -> dict[int, float]:
    """Token-id keys may arrive as strings (JSON objects); values as ints."""
    if not isinstance(value, dict):
        raise ValueError(f"logit_bias must be a dict of token id to bias, got {value!r}")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token_id = key
        if isinstance(key, str):
            try:
                token_id = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        _check_int("logit_bias", token_id, minimum=0)
        _check_number("logit_bias", bias, minimum=-100.0, maximum=100.0)
        out[token_id] = float(bias)
    return out


def _check_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_number(
    name: str, value: object, minimum: float | None = None, maximum: float | None = None
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
