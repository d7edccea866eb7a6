"""Per-step sampling parameters of a batch, gathered once into tensors.

The sampler never looks at a ``SamplingParams``: the engine describes each row
with a ``RowSamplingState`` and ``SamplingMetadata.from_requests`` turns the
batch into a handful of tensors and flags, so that every transformation in the
sampler is one vectorised operation over the batch and is skipped entirely when
no row needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pagedllm.sampling_params import SamplingParams


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The private random stream of a seeded request, to keep in its sampling state."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class RowSamplingState:
    """What the sampler needs to know about one row (one request) of the batch.

    ``generator`` is the request's own random stream (``seeded_generator``) when
    its params carry a seed; the sampler advances it only for this row's draws.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    eos_token_id: int | None = None
    generator: torch.Generator | None = None


@dataclass
class SamplingMetadata:
    """Sampling parameters of a batch of B rows as tensors on the logits' device.

    Optional tensors are None when no row of the batch uses that transformation.
    Token-id tensors are padded with ``vocab_size``, an id one past the vocabulary.
    """

    vocab_size: int
    # [B] bool and [B] float32 (1.0 on greedy rows); None in an all-greedy batch, which
    # draws nothing at random (two tensors fewer in every batch-1 greedy step)
    greedy: torch.Tensor | None
    temperature: torch.Tensor | None
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor | None = None  # [B] long; vocab_size where disabled
    max_top_k: int = 0  # largest enabled top_k, known without a device sync
    top_p: torch.Tensor | None = None  # [B] float32; 1.0 where disabled
    min_p: torch.Tensor | None = None  # [B] float32; 0.0 where disabled
    repetition_penalty: torch.Tensor | None = None  # [B] float32
    presence_penalty: torch.Tensor | None = None  # [B] float32
    frequency_penalty: torch.Tensor | None = None  # [B] float32
    prompt_token_ids: torch.Tensor | None = None  # [B, Lp] long (repetition penalty)
    output_token_ids: torch.Tensor | None = None  # [B, Lo] long (all penalties)
    # Sparse additive edits (row, token, value): logit_bias, and -inf for the stop
    # tokens of rows that have not reached min_tokens.
    bias_rows: torch.Tensor | None = None
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    banned_rows: torch.Tensor | None = None
    banned_tokens: torch.Tensor | None = None
    # Rows of random sampling with their own generator; the rest share the sampler's.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # Largest `logprobs` asked for in the batch; None when no row asks.
    max_num_logprobs: int | None = None
    # Structured output: [B, ceil(V / 32)] int32, bit t % 32 of word t // 32 set where
    # token t is allowed (all bits set on unconstrained rows); None when no row is.
    allowed_bitmask: torch.Tensor | None = None

    @property
    def any_penalties(self) -> bool:
        return (
            self.repetition_penalty is not None
            or self.presence_penalty is not None
            or self.frequency_penalty is not None
        )

    @classmethod
    def from_requests(
        cls,
        rows: Sequence[RowSamplingState],
        vocab_size: int,
        device: torch.device | str = "cpu",
    ) -> SamplingMetadata:
        """Gather the rows' parameters into tensors on ``device``."""
        params = [row.params for row in rows]
        greedy = [p.greedy for p in params]
        random_params = [p for p in params if not p.greedy]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        all_greedy = all(greedy)
        meta = cls(
            vocab_size=vocab_size,
            greedy=None if all_greedy else torch.tensor(greedy, dtype=torch.bool, device=device),
            temperature=(
                None if all_greedy else floats([1.0 if p.greedy else p.temperature for p in params])
            ),
            all_greedy=all_greedy,
            all_random=not any(greedy),
        )

        # Truncation only matters for rows that sample at random.
        enabled_top_k = [p.top_k for p in random_params if 0 < p.top_k < vocab_size]
        if enabled_top_k:
            meta.max_top_k = max(enabled_top_k)
            meta.top_k = torch.tensor(
                [
                    vocab_size if p.greedy or p.top_k == 0 else min(p.top_k, vocab_size)
                    for p in params
                ],
                dtype=torch.long,
                device=device,
            )
        if any(p.top_p < 1.0 for p in random_params):
            meta.top_p = floats([1.0 if p.greedy else p.top_p for p in params])
        if any(p.min_p > 0.0 for p in random_params):
            meta.min_p = floats([0.0 if p.greedy else p.min_p for p in params])

        # Penalties change the argmax too, so they apply to greedy rows as well.
        if any(p.repetition_penalty != 1.0 for p in params):
            meta.repetition_penalty = floats([p.repetition_penalty for p in params])
            meta.prompt_token_ids = _pad([row.prompt_token_ids for row in rows], vocab_size, device)
        if any(p.presence_penalty != 0.0 for p in params):
            meta.presence_penalty = floats([p.presence_penalty for p in params])
        if any(p.frequency_penalty != 0.0 for p in params):
            meta.frequency_penalty = floats([p.frequency_penalty for p in params])
        if meta.any_penalties:
            meta.output_token_ids = _pad([row.output_token_ids for row in rows], vocab_size, device)

        bias = [
            (i, token, value)
            for i, p in enumerate(params)
            for token, value in (p.logit_bias or {}).items()
            if token < vocab_size  # ids past the vocabulary cannot be sampled anyway
        ]
        if bias:
            meta.bias_rows, meta.bias_tokens = _index_pairs(bias, device)
            meta.bias_values = floats([value for _, _, value in bias])

        banned = [
            (i, token)
            for i, row in enumerate(rows)
            if len(row.output_token_ids) < row.params.min_tokens
            for token in _stop_token_ids(row)
            if 0 <= token < vocab_size
        ]
        if banned:
            meta.banned_rows, meta.banned_tokens = _index_pairs(banned, device)

        meta.generators = {
            i: row.generator
            for i, row in enumerate(rows)
            if row.generator is not None and not row.params.greedy
        }
        requested = [p.logprobs for p in params if p.logprobs is not None]
        meta.max_num_logprobs = max(requested) if requested else None
        return meta


def _stop_token_ids(row: RowSamplingState) -> list[int]:
    tokens = list(row.params.stop_token_ids)
    if row.eos_token_id is not None and not row.params.ignore_eos:
        tokens.append(row.eos_token_id)
    return tokens


def _pad(lists: Sequence[Sequence[int]], pad: int, device: torch.device | str) -> torch.Tensor:
    width = max((len(ids) for ids in lists), default=0)
    return torch.tensor(
        [list(ids) + [pad] * (width - len(ids)) for ids in lists],
        dtype=torch.long,
        device=device,
    ).reshape(len(lists), width)


def _index_pairs(
    entries: list[tuple], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor([entry[:2] for entry in entries], dtype=torch.long, device=device)
    return index[:, 0], index[:, 1]
