"""The server's security defaults: API key on every model route, loopback bind, bounded
bodies and prompts, no CORS unless asked, and no code path that unpickles or evaluates
what a user sends.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import pagedllm
from tests.entrypoints.conftest import MODEL, ServerThread
from tests.entrypoints.test_server_errors import raw_exchange

pytestmark = pytest.mark.slow

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GUARDED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    ),
    ("POST", "/tokenize", {"prompt": "Hi"}),
    ("POST", "/detokenize", {"tokens": [1]}),
]
OPEN = ["/health", "/metrics", "/version", "/"]
GIB = 1024**3


@pytest.fixture(scope="module")
def keyed(async_llm) -> Iterator[str]:
    from pagedllm.entrypoints.openai.api_server import build_app

    with ServerThread(build_app(async_llm, [MODEL], api_key=KEY)) as running:
        yield running.url


@pytest.fixture(scope="module")
def cors(async_llm) -> Iterator[str]:
    from pagedllm.entrypoints.openai.api_server import build_app

    app = build_app(async_llm, [MODEL], allowed_origins=["https://ok.example"])
    with ServerThread(app) as running:
        yield running.url


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ------------------------------------------------------------------------ API key


@pytest.mark.parametrize("method,path,body", GUARDED, ids=[p for _, p, _ in GUARDED])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": KEY},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Bearer {KEY}{KEY}"},
    ],
    ids=["none", "wrong", "no-scheme", "prefix", "longer"],
)
def test_every_model_route_needs_the_key(keyed, method, path, body, headers):
    r = httpx.request(method, keyed + path, json=body, headers=headers, timeout=30)
    error = assert_openai_error(r, 401)
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method,path,body", GUARDED, ids=[p for _, p, _ in GUARDED])
def test_the_right_key_opens_every_model_route(keyed, method, path, body):
    r = httpx.request(method, keyed + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text


def test_key_is_checked_before_the_body_is_read(keyed):
    """An unauthenticated client cannot make the server parse (or wait for) its body."""
    r = httpx.post(keyed + "/v1/completions", content=b"{not json", timeout=30)
    assert_openai_error(r, 401)


@pytest.mark.parametrize("path", OPEN)
def test_health_metrics_version_and_page_stay_open(keyed, path):
    assert httpx.get(keyed + path, timeout=30).status_code == 200


def test_key_comparison_is_constant_time(keyed, monkeypatch):
    """Every check goes through hmac.compare_digest, never `==` on the secret."""
    from pagedllm.entrypoints.openai import errors

    calls = []
    real = errors.hmac.compare_digest
    monkeypatch.setattr(
        errors.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b)
    )
    httpx.get(keyed + "/v1/models", headers={"Authorization": "Bearer guess"}, timeout=30)
    httpx.get(keyed + "/v1/models", headers=AUTH, timeout=30)
    assert calls == [(b"guess", KEY.encode()), (KEY.encode(), KEY.encode())]
    source = Path(errors.__file__).read_text()
    assert not re.search(r"api_key\s*[!=]=|==\s*self\.api_key", source)


# ------------------------------------------------------------------------ bind address


def test_serve_binds_loopback_unless_told_otherwise(monkeypatch):
    from pagedllm.entrypoints.cli import build_parser

    monkeypatch.delenv("PAGEDLLM_API_KEY", raising=False)
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.api_key is None and args.allowed_origins is None
    assert build_parser().parse_args(["serve", "--host", "0.0.0.0"]).host == "0.0.0.0"


# ------------------------------------------------------------------------ body size


def gigabyte(chunked: bool) -> Iterator[bytes]:
    """1 GiB of body in 1 MiB pieces, made one at a time (never held whole)."""
    piece = b"a" * (1024 * 1024)
    framed = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    for _ in range(GIB // len(piece)):
        yield framed


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_1gb_body_is_refused_quickly_and_the_server_lives_on(keyed, chunked):
    port = int(keyed.rsplit(":", 1)[1])
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {GIB}"
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()
    start = time.monotonic()
    status, body, sent = raw_exchange(port, head, gigabyte(chunked))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert time.monotonic() - start < 15
    assert sent < 256 * 1024 * 1024  # refused long before the end
    r = httpx.post(keyed + "/tokenize", json={"prompt": "still here"}, headers=AUTH, timeout=30)
    assert r.status_code == 200


# ------------------------------------------------------------------------ context limits


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "hello " * 2100}, "prompt"),
        ("/v1/completions", {"prompt": [1] * 2048}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2048}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2**62}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hello " * 2100}]},
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000},
            "max_tokens",
        ),
    ],
)
def test_prompt_and_max_tokens_are_limited_by_the_context(keyed, path, body, param):
    error = assert_openai_error(httpx.post(keyed + path, json=body, headers=AUTH, timeout=60), 400)
    assert error["param"] == param


# ------------------------------------------------------------------------ CORS


def test_cors_is_off_by_default(server):
    origin = {"Origin": "https://evil.example"}
    r = httpx.get(server.url + "/v1/models", headers=origin, timeout=30)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/completions", headers=preflight, timeout=30)
    assert "access-control-allow-origin" not in r.headers


def test_allowed_origins_enable_cors_for_those_origins_only(cors):
    r = httpx.get(cors + "/v1/models", headers={"Origin": "https://ok.example"}, timeout=30)
    assert r.headers["access-control-allow-origin"] == "https://ok.example"
    r = httpx.get(cors + "/v1/models", headers={"Origin": "https://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers
    preflight = {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(cors + "/v1/completions", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"


# ------------------------------------------------------------------------ no code from data

# Calls that turn data into code or objects. Each allowed hit names its file and why.
FORBIDDEN = re.compile(
    r"\bpickle\b|\bcPickle\b|\bdill\b|torch\.load\(|(?<![.\w])eval\(|(?<![.\w])exec\(|"
    r"\bmarshal\.loads?\(|yaml\.load\(|__import__\(|trust_remote_code\s*=\s*True"
)
ALLOWED: dict[str, str] = {}  # "path/inside/pagedllm.py:pattern" -> reason; none needed today


def test_no_pickle_torch_load_eval_or_exec_in_the_package():
    root = Path(pagedllm.__file__).parent
    hits = []
    for file in sorted(root.rglob("*.py")):
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            for match in FORBIDDEN.finditer(line.split("#", 1)[0]):
                key = f"{file.relative_to(root)}:{match.group()}"
                if key not in ALLOWED:
                    hits.append(f"{file.relative_to(root)}:{n}: {line.strip()}")
    assert not hits, "data-to-code calls in pagedllm:\n" + "\n".join(hits)


def test_the_forbidden_pattern_catches_what_it_should():
    for bad in ("import pickle", "torch.load(f)", "x = eval(s)", "exec(code)", "yaml.load(s)"):
        assert FORBIDDEN.search(bad), bad
    for fine in ("model.eval()", "module.eval().to(x)", "evaluate(x)", "executor(x)"):
        assert not FORBIDDEN.search(fine), fine
