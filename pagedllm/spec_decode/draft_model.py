"""Draft-model proposals: a second, smaller model with the same vocabulary guesses the
next k tokens greedily; the target verifies them in one step.

The draft keeps its own paged KV cache with as many blocks as the target's, reached
through the target's block tables: every slot the scheduler gives a request holds the
target's KV in one pool and the draft's in the other, so the draft needs no allocator,
and copy-on-write, rollback of rejected tokens and freeing follow the target's. Drafts
are made after scheduling (then the slots of the k drafts exist) and before the
target's forward: one forward catches the draft up to the request's last token and
drafts the first token, and k - 1 one-token forwards draft the rest.

A greedy draft is one token with certainty, so verification by the target's own draw
(worker/model_runner.verify_draft) is exact rejection sampling for it: the output
distribution stays the target's at any temperature.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from pagedllm.attention import AttentionMetadata, KVCache
from pagedllm.config import SpeculativeConfig
from pagedllm.core.sched_output import NewRequestData, ScheduledRequest, SchedulerOutput
from pagedllm.model.loader import load_model
from pagedllm.request import Request
from pagedllm.sample.sampler import greedy_tokens
from pagedllm.spec_decode.backoff import Backoff
from pagedllm.spec_decode.proposer import PENDING_DRAFT, decodes_next
from pagedllm.worker.kv_cache import copy_blocks


def load_draft_model(
    config: SpeculativeConfig,
    vocab_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    exact_matmul: bool,
    max_model_len: int,
) -> torch.nn.Module:
    """The draft model of `config.model`, refused unless its vocabulary is the target's
    and its context covers max_model_len (errors name the draft's file)."""
    assert config.model is not None  # SpeculativeConfig requires it for draft_model
    try:
        model = load_model(
            config.model, dtype, device, exact_matmul=exact_matmul, max_model_len=max_model_len
        )
    except ValueError as e:
        raise ValueError(f"speculative draft model {config.model}: {e}") from e
    if model.config.vocab_size != vocab_size:
        raise ValueError(
            f"speculative draft model {config.model} has a vocabulary of "
            f"{model.config.vocab_size} tokens but the target's has {vocab_size}: a draft "
            "must share the target's tokenizer"
        )
    return model


@dataclass(slots=True)
class _Drafted:
    last: int  # position of the token before the drafts
    num_drafts: int


class DraftModelProposer:
    """Fills PENDING_DRAFT slots with a draft model's greedy tokens."""

    def __init__(
        self,
        config: SpeculativeConfig,
        model: torch.nn.Module,
        kv_caches: list[KVCache],
        block_size: int,
        device: torch.device,
    ) -> None:
        self.k = config.num_speculative_tokens
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.backoff = Backoff()
        # per request: how many leading positions hold the draft's KV (the rest is
        # computed again before its next draft)
        self._computed: dict[str, int] = {}
        self._drafted: dict[str, _Drafted] = {}  # this step's drafts, until observed

    def propose(self, requests: Iterable[Request]) -> None:
        """Ask for k draft slots on every request that decodes next step."""
        for request in requests:
            if decodes_next(request) and self.backoff.ready(request.request_id):
                request.spec_token_ids = [PENDING_DRAFT] * self.k

    @torch.inference_mode()
    def draft(self, sched: SchedulerOutput, requests: Mapping[str, NewRequestData]) -> None:
        """Run the draft model for every request the scheduler gave draft slots."""
        copy_blocks(self.kv_caches, sched.block_copies)
        for request_id in sched.preempted_req_ids:  # their blocks are gone
            self._computed.pop(request_id, None)
        jobs = [s for s in sched.scheduled_requests if s.num_draft_tokens]
        if not jobs:
            return
        tables = sched.block_tables
        batch = _Batch()
        for s in jobs:
            self._catch_up(batch, s, requests[s.request_id], tables[s.request_id])
        drafts = self._greedy(batch)
        for s, token in zip(jobs, drafts, strict=True):
            s.token_ids[-s.num_draft_tokens] = token
            last = s.num_computed_tokens_before
            self._drafted[s.request_id] = _Drafted(last, s.num_draft_tokens)
            self._computed[s.request_id] = last + s.num_draft_tokens
        for j in range(1, max(s.num_draft_tokens for s in jobs)):
            # draft j + 1 of each request with that many slots, from draft j
            active = [s for s in jobs if s.num_draft_tokens > j]
            batch = _Batch()
            for s in active:
                position = s.num_computed_tokens_before + j
                token = s.token_ids[j - s.num_draft_tokens - 1]
                batch.add([token], position + 1, tables[s.request_id])
            for s, token in zip(active, self._greedy(batch), strict=True):
                s.token_ids[j - s.num_draft_tokens] = token
        assert all(t != PENDING_DRAFT for s in jobs for t in s.token_ids)

    def _catch_up(
        self, batch: _Batch, s: ScheduledRequest, request: NewRequestData, table: list[int]
    ) -> None:
        """Rows that compute the draft's KV from where it stopped to the request's last
        token, as the target computed them: the prompt as one prefill chunk, every later
        position as a decode row (so a draft equal to the target reproduces its logits)."""
        last = s.num_computed_tokens_before
        tokens = request.all_token_ids
        start = min(self._computed.get(s.request_id, 0), last)
        prompt_end = request.num_prompt_tokens
        if start < prompt_end:
            batch.add(tokens[start:prompt_end], prompt_end, table)
            start = prompt_end
        for position in range(start, last + 1):
            batch.add([tokens[position]], position + 1, table)
        batch.sample_last()

    def _greedy(self, batch: _Batch) -> list[int]:
        """The draft's argmax after each sampled row of one forward."""
        meta = AttentionMetadata.build(
            batch.seq_lens, batch.query_lens, batch.tables, self.block_size, self.device
        )
        ids = torch.tensor(batch.token_ids, device=self.device)
        hidden = self.model(ids, meta.positions, self.kv_caches, meta)
        rows = batch.sampled_rows or list(range(len(batch.token_ids)))
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return greedy_tokens(logits).tolist()

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """Keep the draft's KV of the accepted drafts: the positions up to the last
        accepted one (the last draft was never fed, so all accepted keeps k)."""
        drafted = self._drafted.pop(request_id, None)
        if drafted is not None:
            self._computed[request_id] = drafted.last + min(drafted.num_drafts, num_accepted + 1)
        self.backoff.observe(request_id, num_drafts, num_accepted)

    def release(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        for request_id in request_ids:
            self._computed.pop(request_id, None)
            self._drafted.pop(request_id, None)
        self.backoff.release(request_ids)

    def live_request_ids(self) -> set[str]:
        return set(self._computed) | set(self._drafted) | self.backoff.live_request_ids()


class _Batch:
    """One flat forward of the draft model: sequences of new tokens, and the rows whose
    logits are wanted (every row when none is marked)."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.seq_lens: list[int] = []
        self.query_lens: list[int] = []
        self.tables: list[list[int]] = []
        self.sampled_rows: list[int] = []

    def add(self, token_ids: list[int], seq_len: int, table: list[int]) -> None:
        self.token_ids.extend(token_ids)
        self.seq_lens.append(seq_len)
        self.query_lens.append(len(token_ids))
        self.tables.append(table)

    def sample_last(self) -> None:
        self.sampled_rows.append(len(self.token_ids) - 1)
