"""Percentiles, model FLOPs and the forward timer the benchmark reports rest on."""

import time
from types import SimpleNamespace

import pytest
import torch

from pagedllm.benchmarks.metrics import format_table, summarize
from pagedllm.benchmarks.mfu import linear_params, measure_matmul_flops, request_flops
from pagedllm.worker.forward_timer import ForwardTimer

CONFIG = SimpleNamespace(
    hidden_size=8, q_size=8, kv_size=4, intermediate_size=16, num_layers=2, vocab_size=32
)


def test_summarize_percentiles():
    s = summarize([float(i) for i in range(1, 101)])
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert (s["min"], s["max"]) == (1.0, 100.0)
    assert summarize([])["p99"] == 0.0


def test_request_flops_counts_every_token_and_position():
    body, head = linear_params(CONFIG)
    assert body == 2 * (8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16)
    assert head == 8 * 32
    attn = 4 * 2 * 8
    prompt, outs = 5, [3, 1]
    # brute force: tokens fed at positions, each attending to every position up to its own
    expected = sum(2 * body + attn * (p + 1) for p in range(prompt))
    for out in outs:
        expected += out * 2 * head
        expected += sum(2 * body + attn * (p + 1) for p in range(prompt, prompt + out - 1))
    assert request_flops(CONFIG, prompt, outs) == expected


def test_matmul_benchmark_measures_a_positive_rate():
    assert measure_matmul_flops(16, 16, 16, torch.float32, torch.device("cpu"), 0.01) > 0


def test_forward_timer_accumulates_on_cpu():
    timer = ForwardTimer(torch.device("cpu"))
    for _ in range(2):
        with timer:
            time.sleep(0.01)
    assert 0.02 <= timer.total() < 1.0
    timer.reset()
    assert timer.total() == 0.0


def test_format_table_aligns_values():
    text = format_table("t", [("a", "1"), ("longer label", "22")], width=30)
    lines = text.splitlines()
    assert all(len(line) == 30 for line in lines)
    assert lines[1].endswith(" 1") and lines[2].endswith("22")
