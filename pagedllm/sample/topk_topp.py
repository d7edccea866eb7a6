"""Truncation of the distribution (min-p, top-k, top-p) and the random draw.

Truncation sets the logits of the tokens a row may not pick to -inf. The order
follows vLLM: min-p, then top-k, then top-p over what top-k kept.
"""

from __future__ import annotations

import torch

from pagedllm.sample.metadata import SamplingMetadata

_NEG_INF = float("-inf")


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, _NEG_INF)


def apply_top_k_top_p(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits, then its smallest top-``top_p`` nucleus.

    ``top_k`` equal to the vocabulary size and ``top_p`` equal to 1 disable them
    for a row. Ties at the k-th logit are all kept.
    """
    top_k, top_p = meta.top_k, meta.top_p
    if top_p is None:
        if top_k is not None:
            _apply_top_k_only(logits, top_k, meta.max_top_k)
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab_size = logits.shape[1]
    if top_k is not None:
        # Ascending order: the k largest sit at positions >= V - k.
        kth = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, _NEG_INF)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop the low tail whose total mass is at most 1 - p; the top token always stays.
    drop = cumulative <= (1.0 - top_p.unsqueeze(1))
    drop[:, -1] = False
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, order, sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> None:
    # topk of the largest k asked for is cheaper than a full sort of the vocabulary.
    top_values = logits.topk(max_k, dim=-1).values
    kth = top_values.gather(1, (top_k.clamp(max=max_k) - 1).unsqueeze(1))
    disabled = top_k >= logits.shape[1]
    kth.masked_fill_(disabled.unsqueeze(1), _NEG_INF)
    logits.masked_fill_(logits < kth, _NEG_INF)


def random_sample(
    probs: torch.Tensor, meta: SamplingMetadata, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row from ``probs`` [B, V] by inverting its cumulative sum.

    One uniform u per row picks the first token whose cumulative probability exceeds
    u times the row's total, i.e. token i with probability p_i (a zero-probability token
    adds nothing to the sum, so it is never picked). One draw per row rather than V
    (the exponential race): at V = 49,152 that noise cost ~0.9 ms of a 12 ms decode step.
    Rows with their own generator draw from it alone, so a seeded request's tokens do not
    depend on the rest of the batch; the other rows share ``generator`` (the torch
    default one when None). The sums are in float64, so rounding never skips a token.
    """
    uniform = torch.empty(probs.shape[0], 1, dtype=torch.float64, device=probs.device)
    if len(meta.generators) < probs.shape[0]:
        uniform.uniform_(generator=generator)
    for row, row_generator in meta.generators.items():
        uniform[row].uniform_(generator=row_generator)
    cumulative = probs.to(torch.float64).cumsum_(dim=-1)
    target = uniform * cumulative[:, -1:]
    chosen = torch.searchsorted(cumulative, target, right=True)
    # u * total can round up to the total: then take the last token with any probability
    last = torch.searchsorted(cumulative, cumulative[:, -1:].contiguous(), right=False)
    return torch.minimum(chosen, last).squeeze(1)
