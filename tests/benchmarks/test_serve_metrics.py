"""`bench serve`'s numbers from hand-made request timings: TTFT, TPOT, ITL, throughput,
goodput, the SLO flag, the report and the plot's bins."""

import pytest

from pagedllm.benchmarks.serve_client import RequestResult, RunResult
from pagedllm.benchmarks.serve_metrics import (
    format_results,
    meets_slo,
    parse_slo,
    request_rows,
    serve_report,
)
from pagedllm.benchmarks.serve_plot import output_rate_bins, plot_run


def done(start, chunks, end, tokens, prompt_len=10):
    return RequestResult(
        prompt_len=prompt_len,
        start=start,
        end=end,
        chunk_times=list(chunks),
        output_tokens=tokens,
        prompt_tokens=prompt_len,
        success=True,
    )


def failed(start, error="HTTP 404: no such model"):
    return RequestResult(prompt_len=10, start=start, end=start + 0.1, error=error)


def test_ttft_tpot_and_itl_of_one_request():
    r = done(100.0, [100.2, 100.3, 100.6], 100.6, tokens=3)
    assert r.ttft == pytest.approx(0.2)
    assert r.e2e == pytest.approx(0.6)
    assert r.itls == pytest.approx([0.1, 0.3])
    assert r.tpot == pytest.approx((0.6 - 0.2) / (3 - 1))
    assert done(0.0, [0.5], 0.5, tokens=1).tpot is None  # one token: no TPOT


def test_report_counts_only_successful_requests_in_tokens_and_latencies():
    run = RunResult(
        [
            done(0.0, [0.1, 0.2, 0.3], 0.3, tokens=3),
            done(0.0, [0.4, 0.6], 0.6, tokens=2),
            done(0.5, [0.7], 0.7, tokens=1),
            failed(0.0),
            failed(0.2),
        ],
        duration_s=2.0,
        max_concurrency=4,
    )
    r = serve_report(run)
    assert (r["completed"], r["failed"]) == (3, 2)
    assert r["errors"] == {"HTTP 404: no such model": 2}
    assert r["total_output_tokens"] == 6 and r["total_input_tokens"] == 30
    assert r["request_throughput"] == pytest.approx(1.5)
    assert r["output_throughput"] == pytest.approx(3.0)
    assert r["total_token_throughput"] == pytest.approx(18.0)
    assert r["max_concurrency_reached"] == 4
    assert r["ttft_s"]["mean"] == pytest.approx((0.1 + 0.4 + 0.2) / 3)
    assert r["tpot_s"]["mean"] == pytest.approx((0.1 + 0.2) / 2)  # the 1-token one has none
    assert sorted([r["itl_s"]["min"], r["itl_s"]["max"]]) == pytest.approx([0.1, 0.2])
    assert r["itl_s"]["mean"] == pytest.approx(0.4 / 3)
    assert r["e2e_s"]["max"] == pytest.approx(0.6)
    assert "goodput" not in r
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        s = r[key]
        assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]


def test_goodput_counts_requests_within_every_objective():
    fast = done(0.0, [0.1, 0.15], 0.15, tokens=2)  # ttft 100 ms, tpot 50 ms
    slow_start = done(0.0, [0.5, 0.55], 0.55, tokens=2)  # ttft 500 ms
    slow_decode = done(0.0, [0.1, 0.4], 0.4, tokens=2)  # tpot 300 ms
    one_token = done(0.0, [0.1], 0.1, tokens=1)  # no TPOT to miss
    slo = parse_slo("ttft=200,tpot=100")
    assert [meets_slo(r, slo) for r in (fast, slow_start, slow_decode, one_token)] == [
        True,
        False,
        False,
        True,
    ]
    assert not meets_slo(failed(0.0), {})
    run = RunResult([fast, slow_start, slow_decode, one_token, failed(0.0)], 4.0, 5)
    r = serve_report(run, slo)
    assert r["good_requests"] == 2 and r["goodput"] == pytest.approx(0.5)
    assert r["slo_s"] == {"ttft": 0.2, "tpot": 0.1}
    assert serve_report(run, parse_slo("e2e=200"))["good_requests"] == 2  # fast, one_token


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttft", "expected KEY=MS"),
        ("latency=5", "expected KEY=MS"),
        ("ttft=abc", "must be a number"),
        ("ttft=0", "must be > 0"),
        ("ttft=5,ttft=6", "given twice"),
    ],
)
def test_bad_slo_is_rejected_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_slo(text)


def test_slo_is_read_in_milliseconds():
    assert parse_slo("ttft=250, TPOT=50,e2e=2000") == {"ttft": 0.25, "tpot": 0.05, "e2e": 2.0}


def test_request_rows_and_format_results():
    run = RunResult([done(10.0, [10.2, 10.3], 10.3, 2), failed(10.5)], 1.0, 2)
    rows = request_rows(run)
    assert rows[0]["start_s"] == 0.0 and rows[1]["start_s"] == pytest.approx(0.5)
    assert rows[1] == rows[1] | {
        "success": False,
        "ttft_s": None,
        "error": "HTTP 404: no such model",
    }
    results = {"endpoint": "/v1/completions", "request_rate": "inf"} | serve_report(
        run, parse_slo("ttft=500")
    )
    text = format_results(results)
    for line in ("Successful requests:", "Failed requests:", "TTFT p99 (ms):", "ITL mean (ms):"):
        assert line in text
    assert "Request goodput (req/s):" in text
    assert "1 failed: HTTP 404: no such model" in text


def test_output_rate_bins_spread_usage_tokens_over_chunks(tmp_path):
    # 4 tokens in 2 chunks at 0.5 s and 1.5 s; 3 tokens in 3 chunks in the second bin
    run = RunResult(
        [done(0.0, [0.5, 1.5], 1.5, tokens=4), done(1.0, [1.1, 1.2, 1.3], 1.3, tokens=3)],
        1.5,
        2,
    )
    starts, rates = output_rate_bins(run)
    assert starts.tolist() == [0.0, 1.0]
    assert rates.tolist() == pytest.approx([2.0, 5.0])
    assert rates.sum() == 7  # every usage token, in 1-s bins
    path = tmp_path / "run.png"
    plot_run(run, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
