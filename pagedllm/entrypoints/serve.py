"""`pagedllm serve [MODEL]`: the OpenAI-compatible server, with every engine argument as a flag."""

from __future__ import annotations

import argparse
import os

from pagedllm.entrypoints.cli_args import HelpFormatter, add_engine_args, add_model_arg
from pagedllm.entrypoints.dp_routing import ROUTING_POLICIES
from pagedllm.entrypoints.openai.tool_calls import TOOL_CALL_PARSERS

# Big enough for a prompt filling a 128k-token context (about 0.5 MB of text) several
# times over, or its token ids as JSON; small enough that a flood of bodies cannot
# exhaust memory. (The server itself is imported lazily: --help needs no FastAPI.)
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# Requests waiting for a slot beyond this get 503 with Retry-After, so a burst (or one
# request listing many prompts) cannot queue without bound. The offline API keeps the
# engine's default, unbounded: it queues a whole batch before stepping.
SERVE_MAX_WAITING = 1024


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` on the `pagedllm` command's subparsers."""
    parser = sub.add_parser(
        "serve",
        help="serve the OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API.",
        formatter_class=HelpFormatter,
    )
    add_model_arg(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")
    server.add_argument(
        "--api-key",
        default=os.environ.get("PAGEDLLM_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1/*, /tokenize and /detokenize "
        "(default: $PAGEDLLM_API_KEY; none: open)",
    )
    server.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model name(s) the API answers to; the first is reported "
        "(default: the MODEL argument, or the default model's file name)",
    )
    server.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default="hermes",
        help="how a chat answer's tool calls are read when tool_choice is auto: hermes "
        "(<tool_call>{...}</tool_call>, Hermes and Qwen) or llama3_json (Llama 3's JSON)",
    )
    server.add_argument(
        "--allowed-origins",
        nargs="+",
        default=None,
        metavar="ORIGIN",
        help="enable CORS for these origins ('*' for any) (default: CORS off)",
    )
    server.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="Host header names answered besides the bound address and localhost ('*' for "
        "any), as in llama-server; others get 403, against DNS rebinding "
        "(default: any when bound to 0.0.0.0 or ::)",
    )
    server.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones get 413 unread",
    )
    server.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM or Ctrl-C, seconds to let requests in flight finish while new "
        "ones get 503; then the rest end with an error and the server exits",
    )
    server.add_argument(
        "--log-stats-interval",
        type=float,
        default=10.0,
        help="seconds between stats lines while busy; 0 turns them off",
    )
    server.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="log level of the server and engine",
    )
    server.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="engine replicas, each its own process with its share of the cores, behind "
        "this one server",
    )
    server.add_argument(
        "--dp-routing",
        choices=ROUTING_POLICIES,
        default="least-loaded",
        help="with --data-parallel-size: send each request to the replica with the fewest "
        "in flight, or (prefix) to the one that was sent the longest prefix of its prompt",
    )
    add_engine_args(parser)
    parser.set_defaults(func=run_serve, max_waiting=SERVE_MAX_WAITING)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    from pagedllm.entrypoints.openai.api_server import run_server

    if args.max_request_body_bytes < 1:
        raise SystemExit("pagedllm serve: error: --max-request-body-bytes must be >= 1")
    if args.api_key is not None and not args.api_key.strip():
        raise SystemExit(
            "pagedllm serve: error: --api-key (or $PAGEDLLM_API_KEY) is empty; "
            "give a key, or leave both unset to serve without one"
        )
    if args.data_parallel_size < 1:
        raise SystemExit("pagedllm serve: error: --data-parallel-size must be >= 1")
    if args.data_parallel_size > 1:
        from pagedllm.entrypoints.data_parallel import run_data_parallel

        return run_data_parallel(args)
    return run_server(args)
