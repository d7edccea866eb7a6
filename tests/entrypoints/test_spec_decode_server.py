"""Speculative decoding (n-gram and a draft model) behind the server: streamed and whole completions carry the same
tokens as plain decoding, and /metrics exports the draft counters."""

from __future__ import annotations

import json

import httpx
import pytest

from pagedllm.model.loader import resolve_model_path
from tests.conftest import ENGLISH
from tests.entrypoints.conftest import MODEL, ServerThread, metric_value, start_engine

pytestmark = pytest.mark.slow

PROMPT = f"Repeat the passage word for word.\n\n{ENGLISH}\n\nThe passage again:\n\n"


CONFIGS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
    "draft_model": {"method": "draft_model", "model": str(resolve_model_path(None))},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def spec_server(request):
    from pagedllm.entrypoints.openai.api_server import build_app

    llm = start_engine(speculative_config=CONFIGS[request.param])
    with ServerThread(build_app(llm, [MODEL])) as running:
        yield running
    llm.shutdown()


def test_streamed_and_whole_completions_match_plain_decoding(spec_server, server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    whole = httpx.post(f"{spec_server.url}/v1/completions", json=body, timeout=60).json()
    assert whole["choices"][0]["text"] == plain["choices"][0]["text"]
    assert whole["usage"]["completion_tokens"] == 40
    pieces = []
    with httpx.stream(
        "POST", f"{spec_server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert "".join(pieces) == plain["choices"][0]["text"]
    metrics = httpx.get(f"{spec_server.url}/metrics", timeout=10).text
    accepted = metric_value(metrics, "pagedllm:spec_decode_num_accepted_tokens_total")
    assert 0 < accepted <= metric_value(metrics, "pagedllm:spec_decode_num_draft_tokens_total")
    first = 'pagedllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="smol",position="0"}'
    assert float(next(x for x in metrics.splitlines() if x.startswith(first)).split()[-1]) > 0
