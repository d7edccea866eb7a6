"""Helpers shared by the core tests."""

from __future__ import annotations

from pagedllm.request import Request
from pagedllm.sampling_params import SamplingParams


def make_request(
    request_id: str,
    prompt: list[int] | int,
    max_tokens: int | None = 16,
    *,
    ignore_eos: bool = True,
    eos_token_id: int | None = 0,
    priority: int = 0,
    arrival_time: float = 0.0,
    **params: object,
) -> Request:
    """A request for ``prompt`` (a token list, or a length: tokens 1..n)."""
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else prompt
    return Request(
        request_id=request_id,
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos, **params),
        eos_token_id=eos_token_id,
        arrival_time=arrival_time,
        priority=priority,
    )
