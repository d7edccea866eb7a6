"""`pagedllm serve`: its flags and defaults, and the real command serving a request."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pagedllm.config import EngineArgs
from pagedllm.entrypoints.cli import build_parser
from pagedllm.entrypoints.cli_args import engine_args_from
from pagedllm.entrypoints.serve import SERVE_MAX_WAITING


def test_serve_help_lists_server_and_engine_flags_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in (
        "--host HOST address to bind (default: 127.0.0.1)",
        "--port PORT port to listen on (default: 8000)",
        "--api-key",
        "--served-model-name",
        "--allowed-origins",
        "--max-request-body-bytes",
        "(default: 4194304)",
        "--log-stats-interval",
        "--kv-cache-memory",
        "--max-waiting",
        "--block-size BLOCK_SIZE tokens per KV-cache block (default: 16)",
    ):
        assert flag in text, flag


def test_serve_defaults_are_local_and_round_trip_to_engine_args(monkeypatch):
    monkeypatch.delenv("PAGEDLLM_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.allowed_origins) == (
        "127.0.0.1",
        8000,
        None,
        None,
    )
    # the server bounds its waiting queue (503 beyond); the offline API does not
    assert engine_args_from(args) == EngineArgs(max_waiting=SERVE_MAX_WAITING)
    args = build_parser().parse_args(["serve", "m.gguf", "--max-num-seqs", "4", "--port", "9"])
    assert engine_args_from(args) == EngineArgs(
        model="m.gguf", max_num_seqs=4, max_waiting=SERVE_MAX_WAITING
    )


@pytest.mark.slow
def test_serve_command_answers_then_stops_on_sigint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "pagedllm.entrypoints.cli",
        "serve",
        "--port",
        str(port),
        "--served-model-name",
        "smol",
        "--kv-cache-memory",
        "0.25",
        "--max-model-len",
        "512",
        "--log-stats-interval",
        "0.5",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        body = {"model": "smol", "prompt": "Hi", "max_tokens": 16, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
        # the command re-executed itself (same pid) on mimalloc, not glibc's malloc
        assert "libmimalloc.so" in Path(f"/proc/{proc.pid}/maps").read_text()
        time.sleep(1.0)  # one stats tick after the activity
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    log = out.decode()
    assert proc.returncode == 0, log
    assert "Avg generation throughput" in log and "Prefix cache hit rate" in log
