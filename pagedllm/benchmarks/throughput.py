"""`pagedllm bench throughput`: offline throughput of `LLM.generate` over a whole dataset,
optionally against the same workload through `transformers`' `generate`.

Besides requests and tokens per second it reports what the engine did to get there:
prefix-cache hit rate, mean KV utilization, peak running requests, preemptions, and
the share of each step spent outside the model (scheduling, input preparation,
sampling, detokenization); with `--mfu`, model FLOPs utilization against a matrix
multiply measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from pagedllm.benchmarks.datasets import SampleRequest, add_dataset_args, build_requests

NAME = "throughput"
HELP = "offline throughput of LLM.generate on a dataset, optionally against transformers"
BACKENDS = ("pagedllm", "hf", "hf-only")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("workload")
    add_dataset_args(data)
    data.add_argument("--n", type=int, default=1, help="completions per prompt")
    data.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy"
    )
    data.add_argument(
        "--ignore-eos", action="store_true", help="generate every requested token, past EOS"
    )
    run = parser.add_argument_group("backends and report")
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pagedllm",
        help="pagedllm; hf: pagedllm, then the same workload through transformers, and "
        "their ratio; hf-only: transformers alone",
    )
    run.add_argument(
        "--hf-batch-size", type=int, default=8, help="transformers: requests per static batch"
    )
    run.add_argument(
        "--mfu",
        action="store_true",
        help="report model FLOPs utilization against a torch.mm of "
        "(--max-num-batched-tokens × hidden) @ (hidden × intermediate) measured in the run",
    )
    run.add_argument("--json-out", default=None, help="write the results as JSON to this file")
    run.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "n", "hf_batch_size", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature == 0 and args.n > 1:
        raise ValueError("--n > 1 needs sampling: greedy completions would all be the same")
    if args.dataset == "file" and not args.dataset_path:
        raise ValueError("--dataset file needs --dataset-path")


def _rates(
    num_requests: int, prompt_tokens: int, output_tokens: int, elapsed: float
) -> dict[str, Any]:
    elapsed = max(elapsed, 1e-9)
    return {
        "num_requests": num_requests,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "total_tokens": prompt_tokens + output_tokens,
        "elapsed_s": elapsed,
        "requests_per_s": num_requests / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
    }


def run_pagedllm(
    llm: Any, requests: list[SampleRequest], args: argparse.Namespace
) -> tuple[dict[str, Any], list[list[int]]]:
    """Time `llm.generate` over every request; returns the report and completion lengths."""
    from pagedllm import SamplingParams
    from pagedllm.benchmarks.metrics import engine_report, reset_step_stats

    engine = llm.engine
    warm = {"prompt_token_ids": engine.tokenizer.encode("Warm-up.")}
    llm.generate([warm], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    before = reset_step_stats(engine)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [
        SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=1.0,
            ignore_eos=args.ignore_eos,
            max_tokens=r.output_len,
        )
        for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start
    lengths = [[len(c.token_ids) for c in out.outputs] for out in outputs]
    report = _rates(
        len(requests),
        sum(len(out.prompt_token_ids) for out in outputs),
        sum(map(sum, lengths)),
        elapsed,
    )
    report["num_completions"] = sum(map(len, lengths))
    report.update(engine_report(engine, before))
    return report, lengths


def run_hf(
    path: Any,
    dtype: Any,
    device: Any,
    tokenizer: Any,
    requests: list[SampleRequest],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[list[int]]]:
    import torch

    from pagedllm.benchmarks.hf_backend import HFBackend, load_hf_model, run_hf_benchmark

    model = load_hf_model(path, dtype, device)
    backend = HFBackend(
        model, tokenizer.eos_token_id, tokenizer.hf.pad_token_id, temperature=args.temperature
    )
    torch.manual_seed(args.seed)
    timing, lengths = run_hf_benchmark(
        backend, requests, args.hf_batch_size, args.n, args.ignore_eos
    )
    report = _rates(
        len(requests),
        sum(r.prompt_len for r in requests),
        sum(map(sum, lengths)),
        timing["elapsed_s"],
    )
    report["num_completions"] = sum(map(len, lengths))
    report.update({k: v for k, v in timing.items() if k != "elapsed_s"})
    return report, lengths


def main(args: argparse.Namespace) -> int:
    from pagedllm.benchmarks.metrics import report_main

    return report_main("throughput", run, format_results, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark: build the workload, run each backend, compare; returns the JSON."""
    from pagedllm.engine.llm_engine import resolve_device, resolve_dtype
    from pagedllm.entrypoints.cli_args import engine_args_from
    from pagedllm.model.loader import read_model_config, resolve_model_path
    from pagedllm.tokenizer import load_tokenizer

    _check_args(args)
    engine_args = engine_args_from(args)
    llm = None
    if args.backend != "hf-only":
        from pagedllm import LLM

        llm = LLM(**dataclasses.asdict(engine_args))
        engine = llm.engine
        path, tokenizer, config = engine.model_path, engine.tokenizer, engine.model_config
        device, dtype, max_len = engine.device, engine.dtype, engine.max_model_len
    else:
        path = resolve_model_path(engine_args.model)
        tokenizer, config = load_tokenizer(path), read_model_config(path)
        device = resolve_device(engine_args.device)
        dtype = resolve_dtype(engine_args.dtype, device)
        max_len = engine_args.max_model_len or config.max_position_embeddings
    requests = build_requests(args, tokenizer, config.vocab_size, max_len)
    results: dict[str, Any] = {
        "benchmark": "throughput",
        "model": str(path),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "dataset": args.dataset,
        "num_prompts": len(requests),
        "n": args.n,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
        "temperature": args.temperature,
        "prompt_tokens": sum(r.prompt_len for r in requests),
        "output_tokens_requested": sum(r.output_len for r in requests) * args.n,
        "engine_args": dataclasses.asdict(engine_args),
    }
    if args.dataset == "random":
        results.update(
            {k: getattr(args, k) for k in ("input_len", "output_len", "range_ratio", "prefix_len")}
        )
    workloads: dict[str, list[list[int]]] = {}
    if llm is not None:
        results["pagedllm"], workloads["pagedllm"] = run_pagedllm(llm, requests, args)
    if args.backend != "pagedllm":
        results["hf"], workloads["hf"] = run_hf(path, dtype, device, tokenizer, requests, args)
    if "pagedllm" in results and "hf" in results:
        results["speedup"] = {
            key: results["pagedllm"][key] / max(results["hf"][key], 1e-12)
            for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
        }
    if args.mfu:
        from pagedllm.benchmarks.mfu import measure_matmul_flops, mfu_report

        shape = (engine_args.max_num_batched_tokens, config.hidden_size, config.intermediate_size)
        ceiling = measure_matmul_flops(*shape, dtype=dtype, device=device)
        for name, lengths in workloads.items():
            workload = [(r.prompt_len, outs) for r, outs in zip(requests, lengths, strict=True)]
            results[name]["mfu"] = mfu_report(
                config, workload, results[name]["elapsed_s"], ceiling, shape
            )
    return results


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_results(results: dict[str, Any]) -> str:
    """The human-readable report: one table per backend, then their ratio."""
    from pagedllm.benchmarks.metrics import format_table

    blocks = []
    for name, title in (("pagedllm", "pagedllm throughput"), ("hf", "transformers throughput")):
        r = results.get(name)
        if r is None:
            continue
        rows = [
            ("Requests", f"{r['num_requests']}"),
            ("Prompt tokens", f"{r['prompt_tokens']}"),
            ("Output tokens", f"{r['output_tokens']}"),
            ("Elapsed (s)", f"{r['elapsed_s']:.2f}"),
            ("Requests/s", f"{r['requests_per_s']:.2f}"),
            ("Output tokens/s", f"{r['output_tokens_per_s']:.1f}"),
            ("Total tokens/s", f"{r['total_tokens_per_s']:.1f}"),
        ]
        if name == "pagedllm":
            step = max(r["step_time_s"], 1e-12)
            rows += [
                ("Prefix-cache hit rate", _pct(r["prefix_cache_hit_rate"])),
                ("Mean KV utilization", _pct(r["kv_utilization_mean"])),
                ("Peak running requests", f"{r['peak_running']}"),
                ("Peak KV blocks in use", f"{r['peak_kv_blocks']}"),
                ("KV-cache capacity (tokens)", f"{r['kv_cache_tokens']}"),
                ("Preemptions", f"{r['num_preemptions']}"),
                (
                    "Draft tokens (acceptance)",
                    f"{r['spec_draft_tokens']} ({_pct(r['spec_acceptance_rate'])})",
                ),
                ("Steps", f"{r['num_steps']}"),
                ("Step time outside the model", _pct(r["outside_model_share"])),
                ("  scheduling", _pct(r["schedule_time_s"] / step)),
                ("  inputs + sampling", _pct(r["prepare_and_sample_time_s"] / step)),
                ("  update + detokenize", _pct(r["update_and_detokenize_time_s"] / step)),
            ]
        else:
            rows += [
                ("Batch size", f"{r['hf_batch_size']}"),
                ("Tokens generated (incl. padding)", f"{r['generated_tokens']}"),
            ]
        if "mfu" in r:
            m = r["mfu"]
            rows += [
                ("Model GFLOP/s", f"{m['achieved_gflops']:.1f}"),
                (
                    "torch.mm GFLOP/s " + "x".join(map(str, m["matmul_shape"])),
                    f"{m['matmul_gflops']:.1f}",
                ),
                ("Model FLOPs utilization", _pct(m["mfu"])),
            ]
        blocks.append(format_table(title, rows))
    if "speedup" in results:
        s = results["speedup"]
        blocks.append(
            f"pagedllm / transformers: {s['output_tokens_per_s']:.2f}x output tokens/s, "
            f"{s['requests_per_s']:.2f}x requests/s, {s['total_tokens_per_s']:.2f}x total tokens/s"
        )
    return "\n".join(blocks)
