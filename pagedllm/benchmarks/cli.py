"""`pagedllm bench {throughput,latency}`: the benchmark subcommands, registered on the CLI.

Each benchmark module gives NAME, HELP, `add_cli_args(parser)` and `main(args)`; every
engine argument is a flag too. `bench serve` joins the list once the server exists.
"""

from __future__ import annotations

import argparse

from pagedllm.benchmarks import latency, throughput
from pagedllm.entrypoints.cli_args import HelpFormatter, add_engine_args, add_model_arg

BENCHMARKS = (throughput, latency)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` and its benchmarks to the `pagedllm` command's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        help="measure throughput and latency",
        description="Benchmarks of the engine on the model's own device.",
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
        add_model_arg(parser)
        module.add_cli_args(parser)
        add_engine_args(parser)
        parser.set_defaults(func=module.main)
