"""Every refusal has OpenAI's status and error shape: 400, 401, 404, 405, 413, 503.

The engine here runs one sequence at a time with one waiting slot, so a third
concurrent request finds the queue full.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable, Iterator

import httpx
import openai
import pytest

from tests.entrypoints.conftest import MODEL, ServerThread, start_engine

pytestmark = pytest.mark.slow

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 4 * 1024 * 1024  # the server's default body limit
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def engine():
    llm = start_engine(max_num_seqs=1, max_waiting=1)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    from pagedllm.entrypoints.openai.api_server import build_app

    with ServerThread(build_app(engine, [MODEL], api_key=KEY)) as running:
        yield running.url


def post(url: str, path: str, body: object, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(url + path, content=content, headers=h, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ------------------------------------------------------------------------ 401


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
    ids=["missing", "wrong", "not-bearer"],
)
@pytest.mark.parametrize(
    "method,path", [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/tokenize")]
)
def test_guarded_routes_need_the_key(url, headers, method, path):
    r = httpx.request(method, url + path, headers=headers, json={"prompt": "x"})
    error = assert_error(r, 401)
    assert error["code"] == "invalid_api_key"


def test_open_routes_need_no_key(url):
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/version").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    assert httpx.get(url + "/").status_code in (200, 404)  # 404 until a web page exists
    r = httpx.post(url + "/detokenize", json={"tokens": [1]}, headers=AUTH)
    assert r.status_code == 200


def test_openai_client_with_a_wrong_key_gets_authentication_error(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ------------------------------------------------------------------------ 404 / 405


def test_unknown_model_is_404(url):
    error = assert_error(
        post(url, "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT}), 404, "model"
    )
    assert error["code"] == "model_not_found"
    assert_error(post(url, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404, "model")


def test_unknown_route_is_404_and_wrong_method_405(url):
    assert_error(httpx.get(url + "/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(url + "/nothing"), 404)
    assert_error(httpx.get(url + "/v1/completions", headers=AUTH), 405)


# ------------------------------------------------------------------------ 400


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "max_tokens": -5}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 1000}, "n"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
    ],
)
def test_invalid_completion_values_are_400(url, body, param):
    assert_error(post(url, "/v1/completions", body), 400, param)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({}, "prompt"),
    ],
)
def test_wrong_types_are_400(url, body, param):
    assert_error(post(url, "/v1/completions", body), 400, param)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": CHAT, "max_completion_tokens": -1}, "max_tokens"),
    ],
)
def test_invalid_chat_requests_are_400(url, body, param):
    assert_error(post(url, "/v1/chat/completions", body), 400, param)


def test_malformed_json_is_400(url):
    assert_error(post(url, "/v1/completions", b'{"prompt": "x",'), 400)
    assert_error(post(url, "/v1/chat/completions", b"not json at all"), 400)
    assert_error(post(url, "/v1/chat/completions", b""), 400)
    assert_error(post(url, "/v1/chat/completions", b"[1, 2]"), 400)


def test_prompt_longer_than_the_context_is_400(url):
    long_prompt = "hello " * 2100  # over max_model_len = 2048 tokens
    error = assert_error(post(url, "/v1/completions", {"prompt": long_prompt}), 400, "prompt")
    assert error["code"] == "context_length_exceeded"
    messages = [{"role": "user", "content": long_prompt}]
    assert_error(post(url, "/v1/chat/completions", {"messages": messages}), 400, "messages")
    # prompt + max_tokens over the context
    error = assert_error(post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 2048}), 400)
    assert error["param"] == "max_tokens" and "2048" in error["message"]


def test_tokenize_and_detokenize_errors_are_400(url):
    assert_error(post(url, "/tokenize", {}), 400)
    assert_error(post(url, "/detokenize", {"tokens": [-1]}), 400, "tokens")
    assert_error(post(url, "/detokenize", {"tokens": "abc"}), 400, "tokens")


def test_unknown_fields_are_ignored(url):
    body = {"prompt": "Hi", "max_tokens": 2, "frobnicate": True, "metadata": {"a": 1}}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    chat = {"messages": [{"role": "user", "content": "Hi", "mood": "x"}], "max_tokens": 2, "x": 1}
    assert post(url, "/v1/chat/completions", chat).status_code == 200


# ------------------------------------------------------------------------ 413


def raw_exchange(port: int, head: bytes, body: Iterable[bytes]) -> tuple[int, dict, int]:
    """Send a request from a thread while reading the reply; returns (status, json, bytes sent).

    The reply is read as soon as it comes, so a server that answers before the
    body is complete is seen to do so (the sender stops at the first error).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = 0

    def send() -> None:
        nonlocal sent
        try:
            sock.sendall(head)
            for chunk in body:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head_part, rest = data.split(b"\r\n\r\n", 1)
    lines = head_part.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", headers.get("Content-Length", "0")))
    while len(rest) < length:
        rest += sock.recv(65536)
    sock.close()
    sender.join(5)
    return status, json.loads(rest[:length]), sent


def test_oversized_body_is_413_before_it_is_read(url):
    port = int(url.rsplit(":", 1)[1])
    size = 10 * 1024 * 1024
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    # The body is never sent: the answer must come from the header alone.
    status, body, sent = raw_exchange(port, head, [])
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert sent == 0


def test_oversized_chunked_body_is_413_once_past_the_limit(url):
    port = int(url.rsplit(":", 1)[1])
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b"a" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    # 6 MiB of an unterminated 10 MB body: the reply must come without the rest
    chunks = [chunk] * (6 * 1024 * 1024 // len(piece))
    status, body, sent = raw_exchange(port, head, chunks)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert sent < 10 * 1024 * 1024


def test_openai_client_sending_10mb_gets_413(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="a" * (10 * 1024 * 1024))
    assert e.value.status_code == 413


# ------------------------------------------------------------------------ 503


def test_full_waiting_queue_is_503(url):
    long = {"prompt": "Tell me a story", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(headers=AUTH, timeout=60) as client,
        client.stream("POST", url + "/v1/completions", json=long) as running,
    ):
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: closing it would hang up (and abort)
        assert next(lines).startswith("data: ")  # a first token: it is running now
        with client.stream("POST", url + "/v1/completions", json=long) as waiting:
            assert waiting.status_code == 200  # accepted: waits for the one slot
            r = client.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            error = assert_error(r, 503)
            assert error["code"] == "queue_full"
