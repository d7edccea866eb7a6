"""Tensors in, tokens out: one scheduler step becomes one flat forward and one sampling call."""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pagedllm.attention import AttentionMetadata, KVCache
from pagedllm.core.sched_output import NewRequestData, SchedulerOutput
from pagedllm.sample.grammar import GrammarMatchers
from pagedllm.sample.logprobs import LogprobsTensors, compute_prompt_logprobs
from pagedllm.sample.metadata import RowSamplingState, SamplingMetadata, seeded_generator
from pagedllm.sample.sampler import Sampler
from pagedllm.spec_decode.proposer import Proposer
from pagedllm.worker.forward_timer import ForwardTimer
from pagedllm.worker.kv_cache import copy_blocks


@dataclass
class SampledRow:
    """What one request sampled this step (n > 1 prefills sample n tokens at once; a
    verification emits its accepted drafts and one more)."""

    token_ids: list[int]
    # per token: (top ids, top logprobs, sampled logprob, sampled rank)
    logprobs: list[tuple[list[int], list[float], float, int]] | None = None

    def keep(self, count: int) -> None:
        """Drop all but the first `count` tokens (those the sequence took)."""
        del self.token_ids[count:]
        if self.logprobs is not None:
            del self.logprobs[count:]


@dataclass
class PromptLogprobsChunk:
    """Logprobs of the prompt tokens that one step's chunk predicts.

    Entry k scores prompt token ``start + 1 + k`` from the row at position ``start + k``.
    """

    start: int
    # per predicted token: (top ids, top logprobs, its logprob, its rank)
    rows: list[tuple[list[int], list[float], float, int]]


@dataclass
class RunnerOutput:
    sampled: dict[str, SampledRow]
    prompt_logprobs: dict[str, PromptLogprobsChunk]
    embeddings: dict[str, list[float]] = field(default_factory=dict)  # finished poolings


# Rows of prompt logits materialised at once: 256 × a 49k vocabulary is ~50 MB in fp32.
_PROMPT_LOGITS_CHUNK = 256


class ModelRunner:
    """Owns the model, its KV cache and what it keeps of each request: its tokens and
    parameters (from SchedulerOutput's new requests and deltas: the runner never reads
    the scheduler's requests, so it can run in another process) and random streams."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[KVCache],
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.vocab_size = model.config.vocab_size
        self.sampler = Sampler()
        # the requests scheduled at least once and not finished or preempted since
        self.requests: dict[str, NewRequestData] = {}
        # rank 0 samples; another tensor-parallel rank computes the same logits (its
        # share of the LM head joins them) and returns nothing
        self.is_driver = True
        # whether this step has passed its last collective: an error after it is rank 0's
        # alone, and leaves the ranks in step
        self.collectives_done = False
        self._generators: dict[str, torch.Generator] = {}
        # embedding requests mid-prompt: the sum of their states so far (mean) or the
        # first position's (cls)
        self._pooled: dict[str, torch.Tensor] = {}
        self.forward_timer = ForwardTimer(device)
        # structured output: each constrained request's grammar matcher (set by the engine,
        # which owns the tokenizer); masks are filled on a thread during the forward pass
        self.grammars: GrammarMatchers | None = None
        # speculative decoding: fills the drafts a draft model proposes, before the forward
        self.proposer: Proposer | None = None
        self._mask_thread: ThreadPoolExecutor | None = None

    def generator_for(self, request: NewRequestData) -> torch.Generator | None:
        """The request's own random stream when it is seeded, made on first use."""
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = seeded_generator(seed, self.device)
            self._generators[request.request_id] = generator
        return generator

    def live_request_ids(self) -> list[str]:
        """Requests the runner keeps state for (tokens, random streams, partial poolings)."""
        return [*self.requests, *self._generators, *self._pooled]

    def release(self, request_ids: set[str] | list[str]) -> None:
        for request_id in request_ids:
            self.requests.pop(request_id, None)
            self._generators.pop(request_id, None)
            self._pooled.pop(request_id, None)
        if self.grammars is not None:
            self.grammars.release(request_ids)

    def update_states(self, output: SchedulerOutput) -> None:
        """Bring the runner's requests up to the step: forget finished ones, drop the
        tokens of preempted ones (a seeded stream goes on where it was; a pooling starts
        over), take new ones whole and the others' new output tokens."""
        self.release(output.finished_req_ids)
        for request_id in output.preempted_req_ids:
            self.requests.pop(request_id, None)
            self._pooled.pop(request_id, None)
        for new in output.new_requests:
            self.requests[new.request_id] = new
        for s in output.scheduled_requests:
            if s.new_output_token_ids:
                self.requests[s.request_id].output_token_ids.extend(s.new_output_token_ids)

    def _start_masks(
        self, output: SchedulerOutput
    ) -> tuple[dict[str, int], Future[torch.Tensor]] | None:
        """Begin filling the step's structured-output masks beside the forward pass: the
        row of each constrained request that samples, and the future bitmasks."""
        if self.grammars is None or not self.is_driver:
            return None
        requests = self.requests
        constrained = []
        for s in output.scheduled_requests:
            request = requests[s.request_id]
            if s.samples and request.pooling is None:
                params = request.sampling_params.structured_outputs
                if params is not None:
                    constrained.append((s.request_id, params, list(request.output_token_ids)))
        if not constrained:
            return None
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="pagedllm-masks")
        rows = {request_id: row for row, (request_id, _, _) in enumerate(constrained)}
        return rows, self._mask_thread.submit(self.grammars.fill, constrained)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        """Run one step; returns the sampled tokens of every request that samples, and
        the prompt logprobs of the requests that asked for them.

        `output.num_samples` asks for more than one token from a request's last row (the
        first tokens of an n > 1 request, drawn together from its prompt's logits).
        """
        self.collectives_done = False
        copy_blocks(self.kv_caches, output.block_copies)
        self.update_states(output)
        requests = self.requests
        if self.proposer is not None:
            self.proposer.draft(output, requests)
        num_samples = output.num_samples
        scheduled = output.scheduled_requests
        if not scheduled:
            return RunnerOutput({}, {})
        input_ids: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        rows: list[str] = []  # the request of each attention row
        for s in scheduled:
            input_ids.extend(s.token_ids)
            end = s.num_computed_tokens_before + s.num_new_tokens
            if s.num_draft_tokens:
                # Verification as decode rows, one per position, each seeing the keys up
                # to its own: the decode kernels then compute each position exactly as a
                # plain decode step would have (the same greedy tokens, bit for bit).
                first = end - s.num_draft_tokens
                seq_lens.extend(range(first, end + 1))
                query_lens.extend([1] * (s.num_draft_tokens + 1))
                rows.extend([s.request_id] * (s.num_draft_tokens + 1))
                continue
            seq_lens.append(end)
            query_lens.append(s.num_new_tokens)
            rows.append(s.request_id)
        by_group = output.group_block_tables
        if by_group:
            num_groups = len(by_group[rows[0]])
            tables = [[by_group[r][g] for r in rows] for g in range(num_groups)]
        else:
            tables = [[output.block_tables[r] for r in rows]]
        meta = AttentionMetadata.build_grouped(
            seq_lens, query_lens, tables, self.block_size, self.device
        )
        ids = torch.tensor(input_ids, device=self.device)
        masks = self._start_masks(output)
        with self.forward_timer:
            hidden = self.model(ids, meta.positions, self.kv_caches, meta)
        starts = list(itertools.accumulate((s.num_new_tokens for s in scheduled), initial=0))
        prompt_logprobs = self._prompt_logprobs(output, requests, hidden, starts)
        embeddings = self._pool(output, requests, hidden, starts)
        return RunnerOutput(
            self._sample(output, requests, hidden, starts, num_samples, masks),
            prompt_logprobs,
            embeddings,
        )

    def _pool(
        self,
        output: SchedulerOutput,
        requests: dict[str, NewRequestData],
        hidden: torch.Tensor,
        starts: list[int],
    ) -> dict[str, list[float]]:
        """Fold each embedding request's chunk into its pooled state; the vectors of those
        whose prompt is complete (normalised to unit length when asked)."""
        done: dict[str, list[float]] = {}
        for i, s in enumerate(output.scheduled_requests):
            request = requests[s.request_id]
            if request.pooling is None:
                continue
            rows = hidden[starts[i] : starts[i + 1]].float()
            if request.pooling == "mean":
                total = rows.sum(dim=0)
                if s.request_id in self._pooled:
                    total += self._pooled[s.request_id]
                self._pooled[s.request_id] = total
            elif request.pooling == "cls" and s.num_computed_tokens_before == 0:
                self._pooled[s.request_id] = rows[0]
            if not s.samples:
                continue
            if request.pooling == "last":
                vector = rows[-1]
            else:
                vector = self._pooled.pop(s.request_id)
                if request.pooling == "mean":
                    vector = vector / len(request.prompt_token_ids)
            if request.pooling_normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            done[s.request_id] = vector.tolist()
        return done

    def _sample(
        self,
        output: SchedulerOutput,
        requests: dict[str, NewRequestData],
        hidden: torch.Tensor,
        starts: list[int],
        num_samples: dict[str, int],
        masks: tuple[dict[str, int], Future[torch.Tensor]] | None = None,
    ) -> dict[str, SampledRow]:
        # logits only for the rows that sample: each sampling request's last token, and
        # for a request verifying k drafts its k + 1 last positions
        scheduled = output.scheduled_requests
        sampling = [
            i
            for i, s in enumerate(scheduled)
            if s.samples and requests[s.request_id].pooling is None
        ]
        if not sampling:
            return {}
        positions: list[int] = []
        for i in sampling:
            k = scheduled[i].num_draft_tokens
            positions.extend(range(starts[i + 1] - 1 - k, starts[i + 1]))
        # positions rise: as many as there are rows means every row (a decode step's case,
        # which then skips an index op that cost ~15 µs of a 4 ms batch-1 step)
        every_row = len(positions) == hidden.shape[0]
        with self.forward_timer:  # the LM head is model compute too
            logits = self.model.compute_logits(
                hidden if every_row else hidden[torch.tensor(positions)]
            )
        self.collectives_done = True
        if not self.is_driver:
            return {}

        rows: list[RowSamplingState] = []
        row_logits: list[int] = []
        owners: list[tuple[str, list[int] | None]] = []  # request, the drafts a row checks
        first_row = 0
        for i in sampling:
            s = scheduled[i]
            request = requests[s.request_id]
            # the n first draws of an n > 1 request all come from its prompt's row and,
            # when seeded, from its one stream, advanced draw after draw
            generator = self.generator_for(request)
            drafts = s.token_ids[len(s.token_ids) - s.num_draft_tokens :]
            for j in range(s.num_draft_tokens + 1):
                # row j predicts the token after drafts[:j]: sampled as if they were output
                history = request.output_token_ids + drafts[:j] if j else request.output_token_ids
                draws = 1 if drafts else num_samples.get(request.request_id, 1)
                for _ in range(draws):
                    rows.append(
                        RowSamplingState(
                            params=request.sampling_params,
                            prompt_token_ids=request.prompt_token_ids,
                            output_token_ids=history,
                            eos_token_id=request.eos_token_id,
                            generator=generator,
                        )
                    )
                    row_logits.append(first_row + j)
                    owners.append((request.request_id, drafts[j:] if drafts else None))
            first_row += s.num_draft_tokens + 1
        if len(row_logits) != logits.shape[0]:
            logits = logits[torch.tensor(row_logits, device=logits.device)]
        meta_s = SamplingMetadata.from_requests(rows, self.vocab_size, self.device)
        if masks is not None:
            mask_rows, pending = masks
            bitmasks = pending.result()
            all_allowed = bitmasks.new_full((1, bitmasks.shape[1]), -1)
            table = torch.cat([bitmasks, all_allowed])  # its last row: unconstrained
            unconstrained = table.shape[0] - 1
            index = [mask_rows.get(request_id, unconstrained) for request_id, _ in owners]
            meta_s.allowed_bitmask = table[torch.tensor(index)].to(self.device)
        out = self.sampler(logits, meta_s)
        tokens = out.sampled_token_ids.tolist()
        logprob_rows = _logprob_rows(out.logprobs)
        result: dict[str, SampledRow] = {}
        verified: set[str] = set()  # requests whose verification already ended
        for row, (request_id, drafts) in enumerate(owners):
            if request_id in verified:
                continue
            token, accepted = tokens[row], False
            if drafts:
                token, accepted = verify_draft(token, drafts[0])
            sampled = result.setdefault(request_id, SampledRow([], [] if logprob_rows else None))
            sampled.token_ids.append(token)
            if logprob_rows is not None and sampled.logprobs is not None:
                sampled.logprobs.append(logprob_rows[row])
            if drafts is not None and not accepted:  # the first miss, or the bonus row
                verified.add(request_id)
        return result

    def _prompt_logprobs(
        self,
        output: SchedulerOutput,
        requests: dict[str, NewRequestData],
        hidden: torch.Tensor,
        starts: list[int],
    ) -> dict[str, PromptLogprobsChunk]:
        """Score the prompt tokens each asking request's chunk predicts this step
        (`starts`: each scheduled request's first row in `hidden`)."""
        chunks: dict[str, PromptLogprobsChunk] = {}
        for i, s in enumerate(output.scheduled_requests):
            request = requests[s.request_id]
            num = request.sampling_params.prompt_logprobs
            if num is None:
                continue
            start = s.num_computed_tokens_before
            end = min(start + s.num_new_tokens, len(request.prompt_token_ids) - 1)
            if end <= start:
                continue
            targets = request.prompt_token_ids[start + 1 : end + 1]
            rows: list[tuple[list[int], list[float], float, int]] = []
            for lo in range(0, end - start, _PROMPT_LOGITS_CHUNK):
                hi = min(lo + _PROMPT_LOGITS_CHUNK, end - start)
                logits = self.model.compute_logits(hidden[starts[i] + lo : starts[i] + hi])
                ids = torch.tensor(targets[lo:hi], device=logits.device)
                rows.extend(compute_prompt_logprobs(logits, ids, num).tolist())
            chunks[s.request_id] = PromptLogprobsChunk(start, rows)
        return chunks


def verify_draft(sampled: int, draft: int) -> tuple[int, bool]:
    """What a verification row emits, and whether its draft stands: the row's own draw,
    accepted when it equals the draft. For a draft that is one token with certainty
    (n-gram) this is exact rejection sampling: the draft is kept with probability p(d),
    and otherwise a token is emitted from p without d, renormalised. So the output
    distribution is the target's, greedy or sampled, whatever its processing."""
    return sampled, sampled == draft


def _logprob_rows(
    tensors: LogprobsTensors | None,
) -> list[tuple[list[int], list[float], float, int]] | None:
    return None if tensors is None else tensors.tolist()
