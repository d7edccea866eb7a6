"""The sampler: one next token per row of logits, each row with its own parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.sample.grammar import apply_token_bitmask
from pagedllm.sample.logprobs import LogprobsTensors, gather_logprobs
from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sample.penalties import apply_logit_bias, apply_min_tokens, apply_penalties
from pagedllm.sample.topk_topp import apply_min_p, apply_top_k_top_p, random_sample


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax [B] (long): the first index of its largest value, a NaN counting
    as largest, as torch's. On the CPU numpy's vectorised argmax over the same memory:
    3 µs against torch's 35 µs for a 49,152-wide row, the largest sampling cost of a
    batch-1 greedy step (BENCHMARKS.md, issue 12)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.detach().numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


@dataclass
class SamplerOutput:
    """The token chosen for each row, and its logprobs when any row asked."""

    sampled_token_ids: torch.Tensor  # [B] long
    logprobs: LogprobsTensors | None = None


class Sampler:
    """Turns logits [B, V] into one token per row.

    Order, as in vLLM: raw logprobs; the structured-output mask; min_tokens, logit_bias
    and penalties (these change greedy picks too); greedy argmax; temperature; min-p, top-k, top-p;
    the exponential-race draw. Unseeded random rows share ``generator`` (the
    torch default generator when None); seeded rows use their own, carried in
    the metadata. The input logits are never modified.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)

        edits = (
            meta.banned_rows is not None
            or meta.bias_rows is not None
            or meta.any_penalties
            or meta.allowed_bitmask is not None
        )
        if edits or not meta.all_greedy:
            # The steps below work in place; the caller's logits stay untouched.
            logits = logits.to(torch.float32, copy=True)
        if meta.allowed_bitmask is not None:
            logits = apply_token_bitmask(logits, meta.allowed_bitmask)
        if meta.banned_rows is not None:
            logits = apply_min_tokens(logits, meta)
        if meta.bias_rows is not None:
            logits = apply_logit_bias(logits, meta)
        if meta.any_penalties:
            logits = apply_penalties(logits, meta)

        # An all-greedy batch without edits is a bare argmax.
        sampled = greedy_tokens(logits) if meta.all_greedy else self._sample_random(logits, meta)

        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def _sample_random(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        assert meta.temperature is not None and meta.greedy is not None  # not all greedy
        greedy = None if meta.all_random else greedy_tokens(logits)
        logits.div_(meta.temperature.unsqueeze(1))
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta)
        sampled = random_sample(logits.softmax(dim=-1), meta, self.generator)
        if greedy is None:
            return sampled
        return torch.where(meta.greedy, greedy, sampled)
