"""`pagedllm bench latency`: how long one batch takes, end to end and token by token.

Each iteration submits `--batch-size` random prompts of `--input-len` tokens together
and generates `--output-len` tokens for each (EOS ignored). Every iteration draws fresh
prompts, so the prefix cache never turns a repeat into a hit. Reports percentiles of
the batch's end-to-end latency over iterations, and of time to first token (TTFT) and
time per output token after the first (TPOT) over every request of every iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

NAME = "latency"
HELP = "latency of one batch: end to end, time to first token, time per output token"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--batch-size", type=int, default=8, help="requests submitted together")
    g.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    g.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    g.add_argument("--num-iters", type=int, default=10, help="measured iterations")
    g.add_argument(
        "--num-iters-warmup", type=int, default=2, help="iterations run first, unmeasured"
    )
    g.add_argument("--json-out", default=None, help="write the results as JSON to this file")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pagedllm import LLM, SamplingParams
    from pagedllm.benchmarks.datasets import random_requests
    from pagedllm.benchmarks.metrics import summarize
    from pagedllm.entrypoints.cli_args import engine_args_from

    for name in ("batch_size", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_iters_warmup < 0:
        raise ValueError(f"--num-iters-warmup must be >= 0, got {args.num_iters_warmup}")
    engine_args = engine_args_from(args)
    llm = LLM(**dataclasses.asdict(engine_args))
    engine = llm.engine
    if args.input_len + args.output_len > engine.max_model_len:
        raise ValueError(
            f"--input-len ({args.input_len}) plus --output-len ({args.output_len}) exceed "
            f"max_model_len ({engine.max_model_len})"
        )
    special = set(engine.tokenizer.hf.all_special_ids)
    params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)
    latencies: list[float] = []
    ttfts: list[float] = []
    tpots: list[float] = []
    for it in range(args.num_iters_warmup + args.num_iters):
        batch = random_requests(
            args.batch_size,
            args.input_len,
            args.output_len,
            engine.model_config.vocab_size,
            seed=args.seed * 1_000_003 + it,
            special_ids=special,
        )
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in batch]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        if it < args.num_iters_warmup:
            continue
        latencies.append(elapsed)
        for out in outputs:
            m = out.metrics
            if m.time_to_first_token is not None:
                ttfts.append(m.time_to_first_token)
            if m.mean_time_per_output_token is not None:
                tpots.append(m.mean_time_per_output_token)
    mean_latency = sum(latencies) / len(latencies)
    return {
        "benchmark": "latency",
        "model": str(engine.model_path),
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "batch_size": args.batch_size,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_iters": args.num_iters,
        "num_iters_warmup": args.num_iters_warmup,
        "engine_args": dataclasses.asdict(engine_args),
        "latencies_s": latencies,
        "e2e_s": summarize(latencies),
        "ttft_s": summarize(ttfts),
        "tpot_s": summarize(tpots),
        "output_tokens_per_s": args.batch_size * args.output_len / mean_latency,
    }


def format_results(results: dict[str, Any]) -> str:
    from pagedllm.benchmarks.metrics import PERCENTILES, format_table

    rows = [
        ("Batch size", str(results["batch_size"])),
        ("Input / output tokens", f"{results['input_len']} / {results['output_len']}"),
        ("Iterations (warm-up)", f"{results['num_iters']} ({results['num_iters_warmup']})"),
    ]
    for key, label in (("e2e_s", "End-to-end"), ("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
        s = results[key]
        rows.append((f"{label} mean (ms)", f"{1e3 * s['mean']:.2f}"))
        rows += [(f"{label} p{p} (ms)", f"{1e3 * s[f'p{p}']:.2f}") for p in PERCENTILES]
    rows.append(("Output tokens/s", f"{results['output_tokens_per_s']:.1f}"))
    return format_table("pagedllm latency", rows)


def main(args: argparse.Namespace) -> int:
    from pagedllm.benchmarks.metrics import report_main

    return report_main("latency", run, format_results, args)
