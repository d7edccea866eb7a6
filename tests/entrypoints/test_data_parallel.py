"""`pagedllm serve --data-parallel-size 2`: two replica processes of the default model behind
one front. The front answers as one instance does, spreads load, keeps a shared prefix on
one replica, sums the replicas' metrics, and turns a replica's death into 5xx errors in
OpenAI's shape and an unhealthy /health instead of a hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pagedllm.entrypoints.cli import build_parser
from pagedllm.entrypoints.data_parallel import build_dp_app, sum_metrics
from pagedllm.entrypoints.dp_replicas import (
    Replica,
    ReplicaStartError,
    cpu_shares,
    replica_argv,
    start_replicas,
    stop_replicas,
    wait_until_healthy,
)
from pagedllm.entrypoints.dp_routing import (
    CHUNK_CHARS,
    NoReplicaAlive,
    ReplicaChooser,
    prefix_hashes,
)
from tests.conftest import ENGLISH
from tests.entrypoints.conftest import MODEL, ServerThread, metric_value, wait_for

REPLICA_FLAGS = [
    "--served-model-name", MODEL, "--threads", "1", "--dtype", "float32",
    "--kv-cache-memory", "0.1", "--max-model-len", "1024", "--max-num-seqs", "8",
    "--log-stats-interval", "0", "--log-level", "warning", "--drain-timeout", "2",
]  # fmt: skip
LONG = ENGLISH * 3
OTHER = "Paris is the capital of France. " * 30


# ---- routing and metrics, without processes -------------------------------------------


def test_least_loaded_takes_the_fewest_in_flight_and_round_robins_ties():
    chooser = ReplicaChooser(3)
    first, second, third = (chooser.choose() for _ in range(3))
    assert [first.index, second.index, third.index] == [0, 1, 2]
    chooser.done(second)
    assert chooser.choose().index == 1  # the only one with nothing in flight
    chooser.done(first)
    chooser.done(third)
    assert chooser.choose().index == 2  # a tie between 0 and 2: the turn after 1
    chooser.replicas[0].alive = False
    assert all(chooser.choose().index != 0 for _ in range(4))
    for r in chooser.replicas:
        r.alive = False
    with pytest.raises(NoReplicaAlive):
        chooser.choose()


def test_prefix_routing_follows_the_longest_shared_prefix():
    chooser = ReplicaChooser(2, "prefix")
    a = prefix_hashes("/v1/completions", {"prompt": LONG[:640]})
    b = prefix_hashes("/v1/completions", {"prompt": OTHER[:640]})
    assert len(a) == 640 // CHUNK_CHARS
    home = chooser.choose(a)
    other = chooser.choose(b)
    assert home.index != other.index
    chooser.done(home)
    chooser.done(other)
    longer = prefix_hashes("/v1/completions", {"prompt": LONG[:900]})
    for _ in range(3):  # even while it is the busier one
        assert chooser.choose(longer).index == home.index
    assert chooser.choose(b).index == other.index


def test_prefix_hashes_cover_token_ids_batches_and_conversations():
    ids = list(range(40))
    assert prefix_hashes("/v1/completions", {"prompt": ids}) == prefix_hashes(
        "/v1/completions", {"prompt": [ids, [1]]}
    )
    assert len(prefix_hashes("/v1/completions", {"prompt": ids})) == 2
    chat = {"messages": [{"role": "system", "content": ENGLISH[:300]}]}
    turn = {"role": "user", "content": "and then?"}
    first = prefix_hashes("/v1/chat/completions", chat)
    later = prefix_hashes("/v1/chat/completions", {"messages": [*chat["messages"], turn] * 3})
    assert first and later[: len(first)] == first
    with_tools = prefix_hashes("/v1/chat/completions", {**chat, "tools": [{"x": 1}]})
    assert with_tools[0] != first[0]
    for garbage in (None, [], {"prompt": 3}, {"prompt": [1, [2]] * 20}, {"messages": 5}):
        assert isinstance(prefix_hashes("/v1/completions", garbage), list)
        assert isinstance(prefix_hashes("/v1/chat/completions", garbage), list)


def test_sum_metrics_adds_samples_with_the_same_name_and_labels():
    def text(tokens: float, usage: float, bucket: float) -> str:
        return (
            "# HELP pagedllm:prompt_tokens_total Prompt tokens.\n"
            "# TYPE pagedllm:prompt_tokens_total counter\n"
            f'pagedllm:prompt_tokens_total{{model_name="m"}} {tokens}\n'
            "# HELP pagedllm:kv_cache_usage_perc KV usage.\n"
            "# TYPE pagedllm:kv_cache_usage_perc gauge\n"
            f'pagedllm:kv_cache_usage_perc{{model_name="m"}} {usage}\n'
            "# HELP pagedllm:e2e E2E.\n# TYPE pagedllm:e2e histogram\n"
            f'pagedllm:e2e_bucket{{le="1.0",model_name="m"}} {bucket}\n'
            f'pagedllm:e2e_bucket{{le="+Inf",model_name="m"}} {bucket}\n'
            f'pagedllm:e2e_count{{model_name="m"}} {bucket}\n'
            f'pagedllm:e2e_sum{{model_name="m"}} 0.5\n'
        )

    merged = sum_metrics([text(10, 0.2, 1), text(5, 0.4, 2), ""])
    assert metric_value(merged, "pagedllm:prompt_tokens_total") == 15
    assert metric_value(merged, "pagedllm:kv_cache_usage_perc") == pytest.approx(0.3)
    assert metric_value(merged, "pagedllm:e2e_count") == 3
    assert metric_value(merged, "pagedllm:e2e_sum") == 1.0
    assert 'pagedllm:e2e_bucket{le="+Inf",model_name="m"} 3.0' in merged
    assert sum_metrics([merged]) == merged  # its own output parses back unchanged


def test_replica_command_round_trips_the_engine_flags(monkeypatch):
    monkeypatch.delenv("PAGEDLLM_API_KEY", raising=False)
    flags = ["serve", "m.gguf", "-dp", "2", "--dp-routing", "prefix", "--port", "9"]
    args = build_parser().parse_args([*flags, "--no-enable-prefix-caching", "--max-num-seqs=3"])
    argv = replica_argv(args, 1234, 2)
    again = build_parser().parse_args(argv[3:])
    assert (again.model, again.port, again.threads, again.data_parallel_size) == (
        "m.gguf",
        1234,
        2,
        1,
    )
    assert not again.enable_prefix_caching and again.max_num_seqs == 3
    assert all(t >= 1 for t, _ in cpu_shares(64, None))
    assert cpu_shares(2, 3) == [(3, None), (3, None)]


def test_a_replica_dies_with_the_front():
    """PR_SET_PDEATHSIG: a front killed with SIGKILL leaves no replica behind."""
    code = (
        "import subprocess, time\n"
        "from pagedllm.entrypoints.dp_replicas import _child_setup\n"
        "p = subprocess.Popen(['sleep', '60'], preexec_fn=_child_setup(None))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    front = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(front.stdout.readline())  # type: ignore[union-attr]
    finally:
        front.kill()
        front.wait()
    assert wait_for(lambda: not os.path.exists(f"/proc/{child}"), timeout=5)


def _fake_replica(index: int, engine_running: bool):
    """A replica server whose engine runs or has stopped (as a dead TP rank leaves it)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/health")
    async def health():  # as api_server answers it
        if engine_running:
            return JSONResponse({})
        error = {"message": "the engine has stopped: rank 1 died", "type": "x"}
        return JSONResponse({"error": error}, status_code=503)

    @app.post("/v1/completions")
    async def completions():
        if not engine_running:
            return JSONResponse({"error": {"message": "the engine has stopped"}}, 503)
        return {"replica": index}

    return app


def test_a_replica_whose_engine_stopped_leaves_the_rotation(monkeypatch):
    """Its server still answers, at once and with 503: least-loaded routing would send it
    everything unless the front stops routing to it."""
    from pagedllm.entrypoints import data_parallel

    monkeypatch.setattr(data_parallel, "_WATCH_INTERVAL_S", 0.05)
    with (
        ServerThread(_fake_replica(0, engine_running=False)) as dead,
        ServerThread(_fake_replica(1, engine_running=True)) as alive,
    ):
        app = build_dp_app([Replica(0, dead.url), Replica(1, alive.url)])
        with ServerThread(app) as running:
            assert wait_for(lambda: not app.state.chooser.replicas[0].alive, timeout=10)
            answers = [complete(running.url, "Hi").json() for _ in range(4)]
            assert answers == [{"replica": 1}] * 4
            assert _health(running.url) == 503  # and the front says so


# ---- two real replicas ------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicas():
    args = build_parser().parse_args(["serve", *REPLICA_FLAGS])
    started = start_replicas(args, 2)
    try:
        wait_until_healthy(started, timeout=180)
        yield started
    finally:
        stop_replicas(started, timeout=10)


@pytest.fixture
def front(replicas, request):
    policy = getattr(request, "param", "least-loaded")
    app = build_dp_app(replicas, policy)
    with ServerThread(app) as running:
        running.chooser = app.state.chooser
        yield running


def complete(url: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=120)


def test_the_front_answers_as_one_instance(front, replicas):
    alone = replicas[0].url
    answer = complete(front.url, ENGLISH[:200])
    assert answer.status_code == 200, answer.text
    assert (
        answer.json()["choices"][0]["text"]
        == complete(alone, ENGLISH[:200]).json()["choices"][0]["text"]
    )
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 8,
        "temperature": 0,
    }
    whole = httpx.post(alone + "/v1/chat/completions", json=body, timeout=120).json()
    text = ""
    with httpx.stream(
        "POST", front.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    assert text == whole["choices"][0]["message"]["content"]
    models = httpx.get(front.url + "/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == MODEL
    health = httpx.get(front.url + "/health", timeout=10)
    assert health.status_code == 200 and len(health.json()["replicas"]) == 2
    assert front.chooser.replicas[0].in_flight == front.chooser.replicas[1].in_flight == 0


def success(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pagedllm:request_success_total{")
    )


def test_least_loaded_spreads_concurrent_requests_over_both_replicas(front, replicas):
    before = [success(r.url) for r in replicas]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: complete(front.url, f"Count to {i}:"), range(4)))
    assert all(a.status_code == 200 for a in answers)
    assert [r.routed for r in front.chooser.replicas] == [2, 2]
    assert [success(r.url) - b for r, b in zip(replicas, before, strict=True)] == [2, 2]


@pytest.mark.parametrize("front", ["prefix"], indirect=True)
def test_prefix_routing_sends_a_shared_prefix_to_the_same_replica(front):
    shared = LONG[:800]
    first = complete(front.url, shared)
    home = next(r for r in front.chooser.replicas if r.routed)
    second = complete(front.url, shared + " In short,")
    assert home.routed == 2
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first.json()["usage"]["prompt_tokens"] - 16
    complete(front.url, OTHER[:500])  # nothing shared: the idle replica
    assert all(r.routed for r in front.chooser.replicas)


def test_the_front_metrics_sum_the_replicas(front, replicas):
    complete(front.url, "Hello")
    text = httpx.get(front.url + "/metrics", timeout=10).text
    each = [httpx.get(r.url + "/metrics", timeout=10).text for r in replicas]
    name = "pagedllm:prompt_tokens_total"
    assert metric_value(text, name) == sum(metric_value(t, name) for t in each)
    assert 'pagedllm:dp_replica_up{replica="0"} 1.0' in text
    assert 'pagedllm:dp_replica_up{replica="1"} 1.0' in text


@pytest.mark.parametrize("front", ["prefix"], indirect=True)
def test_a_killed_replica_fails_its_requests_with_5xx_and_the_front_turns_unhealthy(
    front, replicas
):
    """Last in the file: it kills a replica of the module's pair."""
    prompt = LONG[:400]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 600, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        with httpx.stream(
            "POST", front.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
            victim = next(r for r in front.chooser.replicas if r.in_flight)
            whole = pool.submit(httpx.post, front.url + "/v1/completions", json=body, timeout=60)
            assert wait_for(lambda: victim.in_flight == 2)  # same prefix, same replica
            os.kill(replicas[victim.index].process.pid, signal.SIGKILL)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "bad_gateway_error"
        answer = whole.result()
    assert answer.status_code == 502
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}
    health = httpx.get(front.url + "/health", timeout=10)
    assert (
        health.status_code == 503 and f"replica {victim.index}" in health.json()["error"]["message"]
    )
    again = complete(front.url, prompt)  # the same prefix: the survivor takes it
    assert again.status_code == 200, again.text
    assert victim.in_flight == 0
    text = httpx.get(front.url + "/metrics", timeout=10).text
    assert f'pagedllm:dp_replica_up{{replica="{victim.index}"}} 0.0' in text
    stop_replicas([Replica(9, "http://127.0.0.1:1")])  # nothing to stop: no error


@pytest.mark.slow
def test_serve_with_data_parallel_size_starts_and_stops_its_replicas():
    """The command itself: replicas behind the key, and gone once the front stops."""
    port = _free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", "-dp", "2", *REPLICA_FLAGS]
    env = {**os.environ, "PAGEDLLM_API_KEY": "sesame"}
    front = subprocess.Popen([*cmd, "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        up = wait_for(lambda: _health(url) == 200 or front.poll() is not None, timeout=180)
        assert up and front.poll() is None, "the front did not come up"
        children = Path(f"/proc/{front.pid}/task/{front.pid}/children").read_text().split()
        assert len(children) == 2
        assert complete(url, "Hi").status_code == 401  # each replica has the key too
        key = {"Authorization": "Bearer sesame"}
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
        answer = httpx.post(url + "/v1/completions", json=body, headers=key, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        front.send_signal(signal.SIGTERM)
        assert front.wait(30) == 0
    assert wait_for(lambda: not any(Path(f"/proc/{c}").exists() for c in children), timeout=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_a_replica_that_dies_while_starting_is_named_with_its_exit_code():
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(ReplicaStartError, match="replica 1 exited with code 3 while starting"):
        wait_until_healthy([Replica(1, "http://127.0.0.1:1", dead)], timeout=10)
    with pytest.raises(ReplicaStartError, match=r"replica\(s\) 0 did not start within"):
        wait_until_healthy([Replica(0, "http://127.0.0.1:1")], timeout=0.3)
