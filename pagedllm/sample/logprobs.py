"""Log-probabilities reported to the user, from the raw model logits.

As vLLM does by default, they describe the model's own distribution
(log_softmax before penalties, temperature or truncation), whatever was sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogprobsTensors:
    """Per row: the top-K tokens and the chosen token's logprob and rank.

    K is the largest count asked for in the batch; a row that asked for N < K
    reads only the first N columns.
    """

    top_ids: torch.Tensor  # [B, K] long, most likely first
    top_logprobs: torch.Tensor  # [B, K] float32
    sampled_logprob: torch.Tensor  # [B] float32
    sampled_rank: torch.Tensor  # [B] long; 1 = the most likely token

    def tolist(self) -> list[tuple[list[int], list[float], float, int]]:
        """Per row (top_ids, top_logprobs, sampled_logprob, sampled_rank) as Python values."""
        return list(
            zip(
                self.top_ids.tolist(),
                self.top_logprobs.tolist(),
                self.sampled_logprob.tolist(),
                self.sampled_rank.tolist(),
                strict=True,
            )
        )


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Logprobs of ``token_ids`` [B] under ``logits`` [B, V], plus the top ``num_logprobs``.

    Ties share the best rank: the rank is one more than the number of tokens
    strictly more likely than the chosen one.
    """
    return gather_logprobs(torch.log_softmax(logits.float(), dim=-1), token_ids, num_logprobs)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Like ``compute_logprobs`` from already normalised ``logprobs`` [B, V]."""
    top_logprobs, top_ids = logprobs.topk(num_logprobs, dim=-1)
    token_logprobs = logprobs.gather(1, token_ids.long().unsqueeze(1))
    ranks = (logprobs > token_logprobs).sum(dim=-1) + 1
    return LogprobsTensors(
        top_ids=top_ids,
        top_logprobs=top_logprobs,
        sampled_logprob=token_logprobs.squeeze(1),
        sampled_rank=ranks,
    )


def compute_prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Prompt logprobs: row t of ``logits`` [T, V] predicts ``next_token_ids[t]``.

    For a prompt p_0 … p_n, pass the logits at positions 0 … n-1 and the tokens
    p_1 … p_n; the first prompt token has no logprob.
    """
    return compute_logprobs(logits, next_token_ids, num_logprobs)
