"""Odd text and hostile templates over HTTP: a 200 or a 400 in OpenAI's shape, never a 500.

JSON with a lone surrogate escape ("\\ud800") is not valid Unicode: the body parser
refuses it with a 400 naming the problem. A null byte, RTL marks and emoji are text.
A chat template that reaches for Python internals is refused by the sandbox: a 400.
"""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

ODD_STRINGS = [
    r"\ud800",  # lone leading surrogate
    r"a\udfffb",  # lone trailing surrogate
    r"\udfff\ud800",  # reversed pair
    r"\u0000",  # null byte
    r"nul\u0000in the middle",
    r"\u202eevil\u202c RTL override",
    r"\ud83d\ude00 emoji as a pair",
    "🙂 👩‍👩‍👧 literal emoji",
    r"\ufeff\uffff\ufffe noncharacters",
]


def post_raw(url: str, path: str, body: str) -> httpx.Response:
    return httpx.post(
        url + path,
        content=body.encode("utf-8", "surrogatepass"),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


def assert_ok_or_openai_400(r: httpx.Response) -> None:
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        body = r.json()
        assert set(body) == {"error"} and body["error"]["type"] == "invalid_request_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_odd_text_in_chat_completions_is_200_or_400(server, text):
    body = '{"messages": [{"role": "user", "content": "' + text + '"}], "max_tokens": 2}'
    assert_ok_or_openai_400(post_raw(server.url, "/v1/chat/completions", body))


@pytest.mark.parametrize("text", ODD_STRINGS)
def test_odd_text_in_completions_tokenize_and_stop_is_200_or_400(server, text):
    for path, body in (
        ("/v1/completions", '{"prompt": "' + text + '", "max_tokens": 2}'),
        ("/v1/completions", '{"prompt": "Hi", "max_tokens": 2, "stop": ["' + text + '"]}'),
        ("/tokenize", '{"prompt": "' + text + '"}'),
    ):
        assert_ok_or_openai_400(post_raw(server.url, path, body))


def test_lone_surrogate_is_a_400_naming_the_json(server):
    r = post_raw(
        server.url, "/v1/chat/completions", r'{"messages": [{"role": "user", "content": "\ud800"}]}'
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_null_byte_is_ordinary_text(server):
    r = post_raw(server.url, "/tokenize", r'{"prompt": "a\u0000b"}')
    assert r.status_code == 200 and r.json()["count"] >= 3


def test_invalid_utf8_body_is_400(server):
    r = httpx.post(
        server.url + "/v1/completions",
        content=b'{"prompt": "\xff\xfe\xc0"}',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert_ok_or_openai_400(r)
    assert r.status_code == 400


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ messages.append(1) }}",
    ],
)
def test_hostile_model_template_is_a_400_not_a_leak(server, async_llm, monkeypatch, template):
    """As if the model file shipped this template: the chat request fails cleanly."""
    monkeypatch.setattr(async_llm.tokenizer.hf, "chat_template", template)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for path in ("/v1/chat/completions", "/tokenize"):
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert "chat template failed" in r.json()["error"]["message"]
        assert "<class" not in r.text and "__builtins__" not in r.text
