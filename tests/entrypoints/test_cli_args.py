"""The engine flags are generated from EngineArgs: every field has a flag, parsed back whole."""

import argparse
import dataclasses

import pytest

from pagedllm.config import EngineArgs
from pagedllm.entrypoints.cli_args import (
    HelpFormatter,
    add_engine_args,
    add_model_arg,
    check_help_text,
    engine_args_from,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_model_arg(parser)
    add_engine_args(parser)
    return parser


def test_every_field_has_help_and_a_flag() -> None:
    check_help_text()
    text = _parser().format_help()
    for field in dataclasses.fields(EngineArgs):
        if field.name != "model":
            assert "--" + field.name.replace("_", "-") in text


def test_defaults_round_trip_to_engine_args() -> None:
    assert engine_args_from(_parser().parse_args([])) == EngineArgs()


def test_flags_parse_to_typed_values() -> None:
    ns = _parser().parse_args(
        [
            "m.gguf",
            "--dtype",
            "bfloat16",
            "--kv-cache-memory",
            "0.5",
            "--max-model-len",
            "512",
            "--no-enable-prefix-caching",
            "--seed",
            "7",
            "--kv-cache-dtype",
            "int8",
            "--speculative-config",
            '{"method": "ngram", "num_speculative_tokens": 3}',
        ]
    )
    args = engine_args_from(ns)
    assert args == EngineArgs(
        model="m.gguf",
        dtype="bfloat16",
        kv_cache_memory=0.5,
        max_model_len=512,
        enable_prefix_caching=False,
        seed=7,
        kv_cache_dtype="int8",
        speculative_config='{"method": "ngram", "num_speculative_tokens": 3}',
    )
    assert args.speculative is not None and args.speculative.num_speculative_tokens == 3


def test_bad_choice_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--dtype", "int3"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_shows_defaults_once() -> None:
    text = " ".join(_parser().format_help().split())
    assert "(default: 16)" in text  # block size
    assert "(default: None)" not in text


def test_kv_offload_flag_takes_json() -> None:
    ns = _parser().parse_args(["--kv-offload", '{"host_gib": 2, "disk_path": "/tmp/kv"}'])
    args = engine_args_from(ns)
    config = args.kv_offload_config
    assert config is not None and (config.host_gib, config.disk_path) == (2, "/tmp/kv")
    with pytest.raises(ValueError, match="kv_offload is not JSON"):
        engine_args_from(_parser().parse_args(["--kv-offload", "{host_gib: 2}"]))
