"""`pagedllm bench {throughput,latency,serve}`: the benchmark subcommands on the CLI.

Each benchmark module gives NAME, HELP, `add_cli_args(parser)` and `main(args)`. The
offline ones run an engine here, so they take the model and every engine argument as
flags too; `serve` measures a server that runs elsewhere and takes neither.
"""

from __future__ import annotations

import argparse

from pagedllm.benchmarks import latency, serve, throughput
from pagedllm.entrypoints.cli_args import HelpFormatter, add_engine_args, add_model_arg

OFFLINE = (throughput, latency)
BENCHMARKS = (*OFFLINE, serve)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` and its benchmarks to the `pagedllm` command's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        help="measure throughput and latency",
        description="Benchmarks of the engine on the model's own device, or of a running server.",
        formatter_class=HelpFormatter,
    )
    kinds = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for module in BENCHMARKS:
        parser = kinds.add_parser(
            module.NAME,
            help=module.HELP,
            description=(module.__doc__ or "").split("\n\n")[0].strip(),
            formatter_class=HelpFormatter,
        )
        if module in OFFLINE:
            add_model_arg(parser)
        module.add_cli_args(parser)
        if module in OFFLINE:
            add_engine_args(parser)
        parser.set_defaults(func=module.main)
