"""`pagedllm bench` end to end on tiny configurations: the JSON report is complete and
its numbers agree with the workload (smoke tests; the real numbers are in BENCHMARKS.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedllm.entrypoints.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
TINY_ENGINE = ["--kv-cache-memory", "0.25", "--max-model-len", "512", "--disable-tqdm"]


def bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "bench", *args, "--json-out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_engine_report(r: dict, num_requests: int) -> None:
    assert r["num_requests"] == num_requests
    assert r["total_tokens"] == r["prompt_tokens"] + r["output_tokens"]
    assert r["output_tokens_per_s"] == pytest.approx(r["output_tokens"] / r["elapsed_s"])
    assert r["requests_per_s"] == pytest.approx(num_requests / r["elapsed_s"])
    assert 0.0 < r["kv_utilization_mean"] <= 1.0
    assert 1 <= r["peak_running"] <= r["num_completions"]
    assert r["num_preemptions"] >= 0 and r["num_steps"] >= 1
    # the parts of a step add up and fit inside the run
    assert 0.0 < r["model_time_s"] <= r["step_time_s"] <= r["elapsed_s"]
    parts = (
        r["schedule_time_s"]
        + r["prepare_and_sample_time_s"]
        + r["update_and_detokenize_time_s"]
        + r["model_time_s"]
    )
    assert parts == pytest.approx(r["step_time_s"], rel=1e-6)
    assert r["outside_model_share"] == pytest.approx(1 - r["model_time_s"] / r["step_time_s"])
    assert 0.0 <= r["prefix_cache_hit_rate"] <= 1.0


@pytest.mark.slow
def test_throughput_with_shared_prefix_parallel_sampling_and_hf_baseline(tmp_path):
    r = bench(
        tmp_path,
        "throughput",
        *("--num-prompts", "4", "--input-len", "16", "--output-len", "8", "--prefix-len", "32"),
        *("--n", "2", "--ignore-eos", "--backend", "hf", "--hf-batch-size", "2", "--mfu"),
        # two at a time, so the later prompts find the prefix the first ones cached
        *("--max-num-seqs", "2", "--max-num-batched-tokens", "128"),
        *TINY_ENGINE,
    )
    assert r["num_prompts"] == 4 and r["n"] == 2 and r["prefix_len"] == 32
    assert r["prompt_tokens"] == 4 * (32 + 16)
    for name in ("pagedllm", "hf"):
        res = r[name]
        assert res["output_tokens"] == 4 * 8 * 2  # EOS ignored: every token asked for
        assert res["prompt_tokens"] == r["prompt_tokens"]
        assert res["num_completions"] == 8
        m = res["mfu"]
        assert m["matmul_shape"] == [128, 576, 1536]
        assert m["mfu"] == pytest.approx(m["achieved_gflops"] / m["matmul_gflops"])
    check_engine_report(r["pagedllm"], 4)
    assert r["pagedllm"]["prefix_cache_hits"] > 0
    assert r["pagedllm"]["peak_running"] <= 4  # 2 requests, forked into 2 sequences each
    # blocks of 16: two prompts of 48 tokens held once (3 blocks each, the 32-token prefix
    # shared), each of the 4 sequences adds at most one block for its 8 new tokens
    assert r["pagedllm"]["peak_kv_blocks"] <= 2 * 3 + 4
    assert r["hf"]["generated_tokens"] == 4 * 8 * 2
    assert r["speedup"]["output_tokens_per_s"] == pytest.approx(
        r["pagedllm"]["output_tokens_per_s"] / r["hf"]["output_tokens_per_s"]
    )


@pytest.mark.slow
def test_throughput_on_sharegpt_like_and_file_datasets(tmp_path):
    r = bench(
        tmp_path,
        "throughput",
        *("--dataset", "sharegpt-like", "--num-prompts", "3", "--sharegpt-output-len", "4"),
        *("--ignore-eos", "--range-ratio", "0.5"),
        *TINY_ENGINE,
    )
    assert r["dataset"] == "sharegpt-like" and "input_len" not in r
    assert r["pagedllm"]["output_tokens"] == 3 * 4 == r["output_tokens_requested"]
    check_engine_report(r["pagedllm"], 3)

    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(["What is a page table?", {"prompt_token_ids": [1, 504, 3458], "output_len": 3}])
    )
    r = bench(
        tmp_path,
        "throughput",
        *("--dataset", "file", "--dataset-path", str(prompts), "--output-len", "5"),
        *("--ignore-eos", "--enable-prefix-caching", "--no-enable-chunked-prefill"),
        *TINY_ENGINE,
    )
    assert r["num_prompts"] == 2
    assert r["pagedllm"]["output_tokens"] == 5 + 3
    assert r["engine_args"]["enable_chunked_prefill"] is False
    check_engine_report(r["pagedllm"], 2)


@pytest.mark.slow
def test_latency_reports_percentiles(tmp_path):
    r = bench(
        tmp_path,
        "latency",
        *("--batch-size", "2", "--input-len", "16", "--output-len", "4"),
        *("--num-iters", "2", "--num-iters-warmup", "1", "--kv-cache-memory", "0.25"),
    )
    assert len(r["latencies_s"]) == 2
    for key in ("e2e_s", "ttft_s", "tpot_s"):
        s = r[key]
        assert 0.0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert r["ttft_s"]["max"] <= r["e2e_s"]["max"]
    assert r["tpot_s"]["max"] < r["e2e_s"]["max"]
    mean = sum(r["latencies_s"]) / 2
    assert r["output_tokens_per_s"] == pytest.approx(2 * 4 / mean)


def test_bench_help_lists_every_flag_with_its_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["bench"]
    kinds = next(a for a in sub._actions if a.dest == "benchmark").choices
    assert set(kinds) >= {"throughput", "latency"}
    throughput = kinds["throughput"].format_help()
    for flag in ("--num-prompts", "--prefix-len", "--backend", "--hf-batch-size", "--mfu"):
        assert flag in throughput
    assert "--max-num-seqs" in throughput and "(default: 256)" in throughput
    latency = kinds["latency"].format_help()
    for flag in ("--batch-size", "--num-iters-warmup", "--json-out", "--block-size"):
        assert flag in latency


def test_bad_flags_exit_with_a_clear_error(capsys):
    from pagedllm.entrypoints.cli import main

    assert main(["bench", "throughput", "--dataset", "file"]) == 2
    assert "--dataset file needs --dataset-path" in capsys.readouterr().err
    assert main(["bench", "throughput", "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
