"""`pagedllm bench serve` end to end against a real `pagedllm` server on a free port: the
report agrees with the workload, and a server that refuses every request gives failed
requests, not a crash (smoke tests on a tiny configuration)."""

import json

import pytest

from pagedllm.entrypoints.cli import build_parser, main
from tests.entrypoints.conftest import ServerThread, start_engine


@pytest.fixture(scope="module")
def engine():
    llm = start_engine(max_model_len=512)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    from pagedllm.entrypoints.openai.api_server import build_app

    with ServerThread(build_app(engine, ["smol"])) as running:
        yield running


@pytest.fixture
def same_tokenizer(engine, monkeypatch):
    """The server's own tokenizer instead of building it again from the GGUF (~10 s each)."""
    monkeypatch.setattr("pagedllm.tokenizer.load_tokenizer", lambda model: engine.tokenizer)


def bench_serve(server, tmp_path, *args):
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--base-url", server.url, "--json-out", str(out), *args]
    rc = main(argv)
    return rc, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.usefixtures("same_tokenizer")
def test_bench_serve_reports_a_consistent_run(server, tmp_path, capsys):
    png = tmp_path / "serve.png"
    rc, r = bench_serve(
        server,
        tmp_path,
        *("--num-prompts", "4", "--input-len", "16", "--output-len", "8", "--ignore-eos"),
        *("--request-rate", "50", "--max-concurrency", "3", "--seed", "1"),
        *("--slo", "ttft=600000,tpot=600000", "--plot", str(png)),
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Successful requests:" in printed and "Request goodput (req/s):" in printed
    assert r["model"] == "smol"  # the first model the server lists
    assert (r["completed"], r["failed"], r["errors"]) == (4, 0, {})
    assert r["total_output_tokens"] == 4 * 8  # EOS ignored: every token asked for
    assert r["total_input_tokens"] == 4 * 16  # the server's own count of the prompts
    assert 1 <= r["max_concurrency_reached"] <= 3
    assert r["request_throughput"] == pytest.approx(4 / r["duration_s"])
    assert r["output_throughput"] == pytest.approx(32 / r["duration_s"])
    assert r["total_token_throughput"] == pytest.approx(96 / r["duration_s"])
    assert r["goodput"] == pytest.approx(r["request_throughput"])  # generous SLOs: all meet
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        s = r[key]
        assert 0.0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], key
    assert r["ttft_s"]["max"] < r["e2e_s"]["max"] <= r["duration_s"]
    assert len(r["requests"]) == 4 and all(q["output_tokens"] == 8 for q in r["requests"])
    assert png.stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.usefixtures("same_tokenizer")
def test_bench_serve_on_chat_completions(server, tmp_path):
    rc, r = bench_serve(
        server,
        tmp_path,
        *("--endpoint", "/v1/chat/completions", "--num-prompts", "2"),
        *("--input-len", "8", "--output-len", "4", "--ignore-eos"),
    )
    assert rc == 0 and r["completed"] == 2 and r["total_output_tokens"] == 2 * 4
    assert r["total_input_tokens"] > 2 * 8  # the chat template wraps the prompt


@pytest.mark.slow
@pytest.mark.usefixtures("same_tokenizer")
def test_requests_the_server_refuses_are_counted_as_failed(server, tmp_path, capsys):
    rc, r = bench_serve(
        server, tmp_path, "--model", "no-such-model", "--num-prompts", "2", "--output-len", "4"
    )
    assert rc == 1  # nothing succeeded, but the report is printed and written
    assert (r["completed"], r["failed"]) == (0, 2)
    (error,) = r["errors"]
    assert error.startswith("HTTP 404:") and "no-such-model" in error
    assert r["total_output_tokens"] == 0 and r["ttft_s"]["p99"] == 0.0
    assert "Failed requests:" in capsys.readouterr().out


def test_an_unreachable_server_is_a_clear_error(tmp_path, capsys):
    rc = main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"])
    assert rc == 2
    assert "cannot list the models at http://127.0.0.1:9/v1/models" in capsys.readouterr().err


def test_bench_serve_help_lists_its_flags_with_defaults():
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["bench"]
    serve = next(a for a in sub._actions if a.dest == "benchmark").choices["serve"]
    text = serve.format_help()
    for flag in (
        "--base-url",
        "--endpoint",
        "--request-rate",
        "--max-concurrency",
        "--slo",
        "--plot",
        "--prefix-len",
        "--timeout",
    ):
        assert flag in text
    assert "(default: http://127.0.0.1:8000)" in text and "(default: inf)" in text
    assert "--max-num-seqs" not in text  # no engine runs here
