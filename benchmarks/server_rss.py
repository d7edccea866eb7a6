"""Resident memory of `llama-server` and `pagedllm serve` holding the same KV capacity.

Each server is started alone on the default model, sent one short completion (so its
buffers are touched), and measured by the kernel's VmRSS of its process; then stopped.
llama-server holds `-c 8192` tokens of KV (f16); pagedllm the same 8,192 tokens as 512
blocks of 16 (in the model's dtype: float32 by default, or bfloat16).

    python benchmarks/server_rss.py --model M.gguf --llama-server BIN/llama-server
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

TOKENS = 8192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def measure(command: list[str], port: int, timeout: float = 180.0) -> float:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not become healthy")
            time.sleep(0.5)
        body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
        httpx.post(f"{base}/v1/completions", json=body, timeout=120).raise_for_status()
        return rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    pagedllm = str(Path(sys.executable).parent / "pagedllm")
    results = {}
    port = free_port()
    results["llama-server -c 8192"] = measure(
        [args.llama_server, "-m", args.model, "--port", str(port), "-t", str(args.threads),
         "-c", str(TOKENS)], port,
    )  # fmt: skip
    for dtype in ("float32", "bfloat16"):
        port = free_port()
        results[f"pagedllm serve, {dtype}"] = measure(
            [pagedllm, "serve", args.model, "--port", str(port), "--threads", str(args.threads),
             "--dtype", dtype, "--num-kv-blocks", str(TOKENS // 16), "--max-model-len",
             str(TOKENS)], port,
        )  # fmt: skip
    for name, mib in results.items():
        print(f"{name:32s} {mib:8.0f} MiB")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
