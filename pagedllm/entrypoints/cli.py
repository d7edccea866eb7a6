"""The `pagedllm` command line: one subcommand per job, each with its own --help."""

from __future__ import annotations

import argparse
import sys

if __name__ == "__main__":  # `python -m`: choose the allocator before torch is imported
    from pagedllm.allocator import reexec_with_mimalloc

    reexec_with_mimalloc()

from pagedllm.benchmarks import cli as bench_cli
from pagedllm.entrypoints import chat, generate, router
from pagedllm.entrypoints.cli_args import HelpFormatter, add_model_arg
from pagedllm.entrypoints.serve import add_serve_parser
from pagedllm.model.loader import ModelLoadError


def _inspect(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.inspect_model import describe, format_description

    print(format_description(describe(args.model)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedllm", description="LLM inference and serving on PagedAttention."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = sub.add_parser(
        "inspect", help="show what a model file holds", formatter_class=HelpFormatter
    )
    add_model_arg(inspect)
    inspect.set_defaults(func=_inspect)
    add_serve_parser(sub)
    generate.register(sub)
    chat.register(sub)
    bench_cli.register(sub)
    router.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModelLoadError as e:
        print(f"pagedllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading: no traceback
        print(file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
