"""Command-line flags generated from `EngineArgs`: one source of truth for every tunable.

Each dataclass field becomes `--field-name` with the field's default and the help in
`ENGINE_ARG_HELP`; booleans get `--x/--no-x`. `model` is left to each subcommand,
which takes it as a positional argument like `vllm serve MODEL`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from pagedllm.config import DTYPES, ENGINE_ARG_HELP, KV_CACHE_DTYPES, POOLING_CHOICES, EngineArgs
from pagedllm.sampling_params import SamplingParams

_JSON_FLAGS = ("speculative_config", "kv_offload", "kv_transfer_config")  # JSON text
_CHOICES = {
    "dtype": DTYPES,
    "kv_cache_dtype": KV_CACHE_DTYPES,
    "scheduling_policy": ("fcfs", "priority"),
    "pooling": POOLING_CHOICES,
}


def _scalar(tp: Any) -> type:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner
    return tp


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless it is None or the help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


# vLLM's short forms
_SHORT = {"tensor_parallel_size": ("-tp",)}


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per EngineArgs field (except `model` and `skip`) to `parser`."""
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineArgs)
    for field in dataclasses.fields(EngineArgs):
        if field.name == "model" or field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = ENGINE_ARG_HELP[field.name]
        tp = str if field.name in _JSON_FLAGS else _scalar(hints[field.name])
        if tp is bool:
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=field.default,
                help=help_text,
            )
            continue
        kwargs: dict[str, Any] = {"type": tp, "default": field.default, "help": help_text}
        if field.name in _CHOICES:
            kwargs["choices"] = _CHOICES[field.name]
        group.add_argument(flag, *_SHORT.get(field.name, ()), **kwargs)


def engine_args_from(namespace: argparse.Namespace, **overrides: Any) -> EngineArgs:
    """EngineArgs from parsed flags; `model` is read from the namespace when present."""
    values = {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(EngineArgs)
        if hasattr(namespace, f.name)
    }
    values.update(overrides)
    return EngineArgs(**values)


def check_help_text() -> None:
    """Every EngineArgs field has help (a missing one is a bug caught by the tests)."""
    missing = {f.name for f in dataclasses.fields(EngineArgs)} - set(ENGINE_ARG_HELP)
    if missing:
        raise AssertionError(f"ENGINE_ARG_HELP lacks {sorted(missing)}")


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, help=ENGINE_ARG_HELP["model"])


# Sampling flags of the terminal commands, named and defaulted as llama.cpp's:
# (flag, SamplingParams field, type, default, help).
SAMPLING_FLAGS: tuple[tuple[str, str, type, Any, str], ...] = (
    ("--temp", "temperature", float, 0.8, "sampling temperature; 0 is greedy"),
    ("--top-k", "top_k", int, 40, "keep the k most likely tokens; 0 keeps all"),
    ("--top-p", "top_p", float, 0.95, "keep the smallest set of tokens whose probability ≥ p"),
    ("--min-p", "min_p", float, 0.05, "drop tokens below min-p × the top token's probability"),
    ("--repeat-penalty", "repetition_penalty", float, 1.0, "penalty on repeated tokens; 1 is off"),
)


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """Add llama.cpp-style sampling flags; `--seed` is the engine's (see add_engine_args)."""
    group = parser.add_argument_group("sampling")
    for flag, _, tp, default, help_text in SAMPLING_FLAGS:
        group.add_argument(flag, type=tp, default=default, help=help_text)
    group.add_argument(
        "-n",
        "--max-tokens",
        type=int,
        default=max_tokens,
        help="most tokens to generate; -1: until end of text or the context is full",
    )
    group.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the end-of-text token",
    )


def sampling_params_from(namespace: argparse.Namespace) -> SamplingParams:
    """SamplingParams from parsed sampling flags; a bad value raises ValueError naming it."""
    values = {
        field: getattr(namespace, flag[2:].replace("-", "_")) for flag, field, *_ in SAMPLING_FLAGS
    }
    max_tokens = namespace.max_tokens
    return SamplingParams(
        **values,
        max_tokens=None if max_tokens == -1 else max_tokens,
        ignore_eos=namespace.ignore_eos,
    )
