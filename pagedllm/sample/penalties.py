"""Logit edits that depend on a request's history: penalties, bias, min_tokens.

All of them act on the raw logits before temperature, so they change greedy
choices as well as random ones.
"""

from __future__ import annotations

import torch

from pagedllm.sample.metadata import SamplingMetadata


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] occurrence counts of the ids in ``token_ids`` [B, L] (padded with V)."""
    counts = torch.zeros(
        token_ids.shape[0], vocab_size + 1, dtype=torch.int32, device=token_ids.device
    )
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (HF/vLLM), presence and frequency (OpenAI) penalties, in place."""
    vocab_size = logits.shape[1]
    output_counts = token_counts(meta.output_token_ids, vocab_size)
    if meta.repetition_penalty is not None:
        # Over prompt and output tokens: shrink a seen token's logit towards -inf
        # whatever its sign (divide if positive, multiply if negative).
        seen = (token_counts(meta.prompt_token_ids, vocab_size) > 0) | (output_counts > 0)
        penalty = meta.repetition_penalty.unsqueeze(1).expand_as(logits)
        scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, scaled, logits)
    if meta.frequency_penalty is not None:
        logits -= meta.frequency_penalty.unsqueeze(1) * output_counts
    if meta.presence_penalty is not None:
        logits -= meta.presence_penalty.unsqueeze(1) * (output_counts > 0)
    return logits


def apply_logit_bias(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Add each request's ``logit_bias`` to its row, in place."""
    logits.index_put_((meta.bias_rows, meta.bias_tokens), meta.bias_values, accumulate=True)
    return logits


def apply_min_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Forbid EOS and stop tokens in rows that have fewer than ``min_tokens`` outputs.

    A row whose structured-output constraint allows nothing but those tokens (its
    grammar has matched: a regex "" from the first token) keeps them: the constraint
    wins, since nothing could be sampled otherwise (an all -inf row drew an id past the
    vocabulary and failed the whole step)."""
    rows, tokens = meta.banned_rows, meta.banned_tokens
    before = logits[rows, tokens]
    logits[rows, tokens] = float("-inf")
    dead = torch.isneginf(logits.amax(dim=-1))  # no host sync: a GPU step stays queued
    logits[rows, tokens] = torch.where(dead[rows], before, float("-inf"))
    return logits
