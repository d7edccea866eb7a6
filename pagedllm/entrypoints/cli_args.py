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

from pagedllm.config import DTYPES, ENGINE_ARG_HELP, EngineArgs

_CHOICES = {"dtype": DTYPES, "scheduling_policy": ("fcfs", "priority")}


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


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per EngineArgs field (except `model` and `skip`) to `parser`."""
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineArgs)
    for field in dataclasses.fields(EngineArgs):
        if field.name == "model" or field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = ENGINE_ARG_HELP[field.name]
        tp = _scalar(hints[field.name])
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
        group.add_argument(flag, **kwargs)


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
