"""`pagedllm bench serve`: load a running OpenAI-compatible server (ours or any other) with
streamed requests, and report throughput, TTFT, TPOT, ITL, end-to-end latency and goodput.

Prompts come from the same seeded datasets as `bench throughput`, made with the tokenizer
alone (no weights are loaded). /v1/completions is sent the prompts as token ids, so the
server sees exactly the lengths asked for; /v1/chat/completions gets them decoded to
text inside one user message. Requests arrive as a seeded Poisson process of
`--request-rate` per second (inf: all at once), at most `--max-concurrency` in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from typing import Any

from pagedllm.benchmarks.datasets import SampleRequest, add_dataset_args, build_requests
from pagedllm.benchmarks.serve_client import CHAT, COMPLETIONS, ENDPOINTS

NAME = "serve"
HELP = "throughput and latency of a running OpenAI-compatible server, under a request rate"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    server.add_argument("--endpoint", choices=ENDPOINTS, default=COMPLETIONS, help="API to load")
    server.add_argument(
        "--model", default=None, help="model name to request (default: the first of /v1/models)"
    )
    server.add_argument(
        "--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY when set)"
    )
    server.add_argument(
        "--tokenizer",
        default=None,
        help="GGUF file or Hugging Face folder whose tokenizer builds the prompts "
        "(default: the default model's)",
    )
    server.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    data = parser.add_argument_group("workload")
    add_dataset_args(data)
    data.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrivals")
    data.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy"
    )
    data.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate every requested token, past EOS (vLLM's extra field ignore_eos)",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second, Poisson arrivals; inf sends all at once",
    )
    load.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight at once"
    )
    report = parser.add_argument_group("report")
    report.add_argument(
        "--slo",
        default=None,
        metavar="ttft=MS,tpot=MS[,e2e=MS]",
        help="service-level objectives in ms: report goodput, the requests/s meeting all",
    )
    report.add_argument("--json-out", default=None, help="write the results as JSON to this file")
    report.add_argument(
        "--plot", default=None, metavar="PNG", help="draw throughput and latency over time"
    )
    report.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _check_args(args: argparse.Namespace) -> dict[str, float] | None:
    from pagedllm.benchmarks.serve_metrics import parse_slo

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.dataset == "file" and not args.dataset_path:
        raise ValueError("--dataset file needs --dataset-path")
    return parse_slo(args.slo) if args.slo else None


async def served_models(client: Any) -> list[dict[str, Any]]:
    """The entries of GET /v1/models."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    return list(response.json().get("data") or [])


async def pick_model(client: Any, requested: str | None) -> tuple[str, int | None]:
    """The model to ask for and its max_model_len when the server says it. Without
    `requested`, the first served model; a server that cannot list them is an error."""
    import httpx

    try:
        models = await served_models(client)
    except (httpx.HTTPError, ValueError) as e:
        if requested is not None:  # listing is only a courtesy then
            return requested, None
        raise ValueError(f"cannot list the models at {client.base_url}/v1/models: {e}") from e
    if requested is None:
        if not models:
            raise ValueError(f"{client.base_url}/v1/models lists no model; pass --model")
        requested = str(models[0]["id"])
    entry = next((m for m in models if m.get("id") == requested), {})
    max_len = entry.get("max_model_len")
    return requested, int(max_len) if isinstance(max_len, int) else None


def build_payload(
    args: argparse.Namespace, model: str, request: SampleRequest, tokenizer: Any
) -> dict[str, Any]:
    """The JSON body of one streamed request (see the module doc for the prompt's form)."""
    payload: dict[str, Any] = {
        "model": model,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == CHAT:
        text = tokenizer.decode(request.prompt_token_ids)
        payload["messages"] = [{"role": "user", "content": text}]
        payload["max_completion_tokens"] = request.output_len
    else:
        payload["prompt"] = request.prompt_token_ids
        payload["max_tokens"] = request.output_len
    if args.ignore_eos:
        payload["ignore_eos"] = True
    return payload


async def _bench(args: argparse.Namespace, slo: dict[str, float] | None) -> dict[str, Any]:
    import httpx
    from tqdm import tqdm

    from pagedllm.benchmarks.serve_client import poisson_arrivals, run_requests
    from pagedllm.benchmarks.serve_metrics import request_rows, serve_report
    from pagedllm.model.loader import resolve_model_path
    from pagedllm.tokenizer import load_tokenizer

    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connections = min(args.max_concurrency or args.num_prompts, args.num_prompts)
    async with httpx.AsyncClient(
        base_url=args.base_url.rstrip("/"),
        headers=headers,
        timeout=httpx.Timeout(args.timeout),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    ) as client:
        model, max_len = await pick_model(client, args.model)
        tokenizer = load_tokenizer(args.tokenizer)
        requests = build_requests(args, tokenizer, len(tokenizer.hf), max_len)
        payloads = [(build_payload(args, model, r, tokenizer), r.prompt_len) for r in requests]
        arrivals = poisson_arrivals(len(requests), args.request_rate, args.seed)
        rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s"
        print(
            f"bench serve: {len(requests)} requests to {args.base_url}{args.endpoint} "
            f"(model {model!r}, rate {rate}, max concurrency {args.max_concurrency or 'none'})",
            file=sys.stderr,
            flush=True,
        )
        with tqdm(total=len(payloads), unit="req", disable=args.disable_tqdm) as bar:
            run = await run_requests(
                client,
                args.endpoint,
                payloads,
                arrivals,
                args.max_concurrency,
                args.timeout,
                on_done=lambda _: bar.update(),
            )
    results: dict[str, Any] = {
        "benchmark": "serve",
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": model,
        "tokenizer": str(resolve_model_path(args.tokenizer)),
        "dataset": args.dataset,
        "num_prompts": len(requests),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "ignore_eos": args.ignore_eos,
        "temperature": args.temperature,
        "seed": args.seed,
        "output_tokens_requested": sum(r.output_len for r in requests),
    }
    if args.dataset == "random":
        results.update(
            {k: getattr(args, k) for k in ("input_len", "output_len", "range_ratio", "prefix_len")}
        )
    results.update(serve_report(run, slo))
    results["requests"] = request_rows(run)
    if args.plot:
        from pagedllm.benchmarks.serve_plot import plot_run

        plot_run(run, args.plot, f"bench serve: {model} at {rate}, {len(requests)} requests")
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark against the server at `args.base_url`; returns the JSON."""
    slo = _check_args(args)
    return asyncio.run(_bench(args, slo))


def main(args: argparse.Namespace) -> int:
    """Print the report (and write --json-out); exit 1 when no request succeeded."""
    from pagedllm.benchmarks.metrics import report_main
    from pagedllm.benchmarks.serve_metrics import format_results

    return report_main("serve", run, format_results, args, lambda r: bool(r["completed"]))
