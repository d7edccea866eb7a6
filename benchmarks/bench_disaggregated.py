"""A disaggregated pair (prefill and decode instances behind `pagedllm router`) against
one instance with the same total threads: the same answers, and the decode streams'
token pace while long prompts arrive.

1. Answers: the 64-prompt reference workload (64-256 tokens of English, 128 greedy
   tokens each), 8 at a time, through the router and through the single instance.
2. Mixed load: 8 streams of short prompts (64 tokens in, 64 out) loop for DURATION
   seconds while a 2,000-token prompt arrives every 4 seconds; reported: the short
   streams' TPOT p50/p99 and their inter-token gap p99.

Servers run as `pagedllm serve` processes: the single instance with 2 threads, the
producer and the consumer with 1 each.

    .venv/bin/python benchmarks/bench_disaggregated.py [--exact-matmul] [--duration 60]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from pagedllm.benchmarks.datasets import english_corpus
from pagedllm.model.loader import default_model_path
from pagedllm.tokenizer import load_tokenizer

PAGEDLLM = str(Path(sys.executable).with_name("pagedllm"))


def start(port: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PAGEDLLM, "serve", "--port", str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_router(port: int, prefill: int, decode: int) -> subprocess.Popen:
    return subprocess.Popen(
        [PAGEDLLM, "router", "--port", str(port), "--prefill", f"http://127.0.0.1:{prefill}",
         "--decode", f"http://127.0.0.1:{decode}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_healthy(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")


def reference_prompts(tokenizer) -> list[list[int]]:
    ids = tokenizer.encode(english_corpus()[:400_000], add_special_tokens=False)
    rng = random.Random(0)
    prompts = []
    for _ in range(64):
        length = rng.randint(64, 256)
        begin = rng.randrange(len(ids) - length)
        prompts.append(ids[begin : begin + length])
    return prompts


def answers(url: str, prompts: list[list[int]]) -> tuple[list[str], float]:
    def one(prompt: list[int]) -> str:
        body = {"prompt": prompt, "max_tokens": 128, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=600)
        answer.raise_for_status()
        return answer.json()["choices"][0]["text"]

    start_time = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, prompts))
    return texts, time.perf_counter() - start_time


def stream_times(url: str, prompt: list[int], max_tokens: int) -> list[float]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    times = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk["choices"]):
                    times.append(time.perf_counter())
    return times


def mixed_load(url: str, short: list[list[int]], long: list[int], duration: float) -> dict:
    stop = time.monotonic() + duration
    tpots: list[float] = []
    gaps: list[float] = []
    lock = threading.Lock()

    def streamer(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            times = stream_times(url, short[i % len(short)], 64)
            i += 8
            if len(times) > 1:
                with lock:
                    tpots.append((times[-1] - times[0]) / (len(times) - 1))
                    gaps.extend(b - a for a, b in itertools.pairwise(times))

    def long_prompts() -> None:
        n = 0
        while time.monotonic() < stop:
            sent = time.monotonic()
            body = {"prompt": [n % 100 + 10, *long], "max_tokens": 16, "temperature": 0}
            httpx.post(url + "/v1/completions", json=body, timeout=600)
            n += 1
            time.sleep(max(0.0, 4.0 - (time.monotonic() - sent)))

    threads = [threading.Thread(target=streamer, args=(k,)) for k in range(8)]
    threads.append(threading.Thread(target=long_prompts))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q = statistics.quantiles
    return {
        "streams": len(tpots),
        "tpot_p50_ms": 1000 * statistics.median(tpots),
        "tpot_p99_ms": 1000 * q(tpots, n=100)[98],
        "gap_p99_ms": 1000 * q(gaps, n=100)[98],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exact-matmul", action="store_true")
    parser.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args()
    flags = ["--exact-matmul"] if args.exact_matmul else []
    tokenizer = load_tokenizer(default_model_path())
    prompts = reference_prompts(tokenizer)
    text = english_corpus()
    ids = tokenizer.encode(text[:40_000], add_special_tokens=False)
    short = [ids[i * 64 : (i + 1) * 64] for i in range(16)]
    long = tokenizer.encode(text[100_000:120_000], add_special_tokens=False)[:2000]
    results = {}

    single = start(8301, "--threads", "2", *flags)
    try:
        wait_healthy("http://127.0.0.1:8301")
        results["single_answers"], results["single_s"] = answers("http://127.0.0.1:8301", prompts)
        results["single_load"] = mixed_load("http://127.0.0.1:8301", short, long, args.duration)
    finally:
        single.terminate()
        single.wait()

    # then the pair, on the same cores
    producer = start(8302, "--threads", "1", *flags, "--kv-transfer-config",
                     '{"kv_role": "kv_producer", "kv_port": 14591}')  # fmt: skip
    consumer = start(8303, "--threads", "1", *flags, "--kv-transfer-config",
                     '{"kv_role": "kv_consumer", "kv_producers": ["127.0.0.1:14591"]}')  # fmt: skip
    router = start_router(8300, 8302, 8303)
    try:
        for port in (8302, 8303, 8300):
            wait_healthy(f"http://127.0.0.1:{port}")
        url = "http://127.0.0.1:8300"
        results["pair_answers"], results["pair_s"] = answers(url, prompts)
        results["pair_load"] = mixed_load(url, short, long, args.duration)
        metrics = httpx.get("http://127.0.0.1:8303/metrics", timeout=10).text

        def counter(name: str) -> float:
            lines = [x for x in metrics.splitlines() if x.startswith(f"pagedllm:{name}{{")]
            return float(lines[0].split()[-1]) if lines else float("nan")

        results["pulled"] = counter("kv_transfer_blocks_loaded_remote_total")
        results["mb"] = counter("kv_transfer_bytes_loaded_total") / 1e6
        results["load_s"] = counter("kv_transfer_load_seconds_total")
    finally:
        for process in (router, producer, consumer):
            process.terminate()
            process.wait()

    same = sum(
        a == b for a, b in zip(results["single_answers"], results["pair_answers"], strict=True)
    )
    print(f"path: {'exact float32' if args.exact_matmul else 'default (int8 activations)'}; "
          f"CPU threads: single 2, pair 1 + 1; {os.cpu_count()} cores")  # fmt: skip
    print(f"reference workload: {same}/64 answers identical; single {results['single_s']:.1f} s, "
          f"pair {results['pair_s']:.1f} s; decode instance pulled {results['pulled']:.0f} blocks, "
          f"{results['mb']:.0f} MB in {results['load_s']:.1f} s of loads "
          f"({results['mb'] / max(results['load_s'], 1e-9):.0f} MB/s per load)")  # fmt: skip
    for name in ("single", "pair"):
        r = results[f"{name}_load"]
        print(f"mixed load, {name:6s}: {r['streams']} short streams, TPOT p50 {r['tpot_p50_ms']:.1f} ms, "
              f"p99 {r['tpot_p99_ms']:.1f} ms; inter-token gap p99 {r['gap_p99_ms']:.1f} ms")  # fmt: skip
    ratio = results["pair_load"]["tpot_p99_ms"] / results["single_load"]["tpot_p99_ms"]
    print(f"TPOT p99, pair / single: {ratio:.2f}")


if __name__ == "__main__":
    main()
