"""TTFT of a long shared prefix after its blocks left the KV pool: recomputed, loaded from
the host tier, and loaded from the disk tier by a restarted engine.

A PREFIX-token prefix of real English text is computed once; unrelated prompts then take
over every block of the pool (PREFIX + 240 tokens of room), and the prefix comes back with
a new suffix. Without --kv-offload it is recomputed; with a host tier it is loaded from
host memory; a second engine on the same disk_path (host tier off) loads it from disk
(the files are in the page cache: a cold disk reads slower). With both tiers the disk
tier writes every computed block on a background thread, which competes with the
engine for a small machine's cores: the host tier is measured alone too.

    .venv/bin/python benchmarks/bench_kv_offload.py [PREFIX_LEN]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.datasets import english_corpus

PARAMS = SamplingParams(temperature=0, max_tokens=1)


def prompt(llm: LLM, prefix: list[int], i: int) -> dict[str, list[int]]:
    suffix = llm.get_tokenizer().encode(f" Question {i}: what follows?", add_special_tokens=False)
    return {"prompt_token_ids": prefix + suffix}


def ttft(llm: LLM, request: dict[str, list[int]]) -> tuple[float, int]:
    [out] = llm.generate(request, PARAMS, use_tqdm=False)
    return out.metrics.time_to_first_token, out.num_cached_tokens


def make_llm(num_blocks: int, kv_offload: dict | None) -> LLM:
    llm = LLM(dtype="float32", num_kv_blocks=num_blocks, kv_offload=kv_offload)
    llm.generate({"prompt_token_ids": [1, 2, 3]}, PARAMS, use_tqdm=False)  # warm-up
    return llm


def run(prefix_len: int, kv_offload: dict | None, label: str) -> None:
    num_blocks = prefix_len // 16 + 16
    llm = make_llm(num_blocks, kv_offload)
    text = english_corpus()
    tokenizer = llm.get_tokenizer()
    prefix = tokenizer.encode(text[: prefix_len * 8], add_special_tokens=False)[:prefix_len]
    first, _ = ttft(llm, prompt(llm, prefix, 0))
    filler = [
        {"prompt_token_ids": [(7 * k + i) % 20000 + 100 for i in range(800)]} for k in range(6)
    ]
    start = time.perf_counter()
    llm.generate(filler, PARAMS, use_tqdm=False)
    evict_s = time.perf_counter() - start
    again, cached = ttft(llm, prompt(llm, prefix, 1))
    print(
        f"{label:28s} first {first * 1000:7.1f} ms | after eviction {again * 1000:7.1f} ms, "
        f"{cached} tokens cached (x{first / again:.1f}); eviction load {evict_s:.1f} s"
    )
    llm.engine.close()  # the disk writes finish
    if kv_offload is not None and kv_offload.get("disk_path"):
        os.sync()  # a restart is not instantaneous: the written blocks reach the disk first
        restarted = make_llm(num_blocks, {"host_gib": 0, "disk_path": kv_offload["disk_path"]})
        after, cached = ttft(restarted, prompt(restarted, prefix, 2))
        metrics = restarted.engine.get_metrics()
        print(
            f"{'restarted, disk tier':28s} first {after * 1000:7.1f} ms, {cached} tokens cached "
            f"(x{first / after:.1f} against recomputing), "
            f"{metrics['kv_offload_blocks_loaded_disk']:.0f} blocks from disk in "
            f"{metrics['kv_offload_load_seconds'] * 1000:.0f} ms"
        )
        restarted.engine.close()


def main() -> None:
    prefix_len = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    run(prefix_len, None, "no offload (recompute)")
    run(prefix_len, {"host_gib": 2}, "host tier")
    with tempfile.TemporaryDirectory() as disk:
        run(prefix_len, {"host_gib": 2, "disk_path": disk}, "host + disk tiers")


if __name__ == "__main__":
    main()
