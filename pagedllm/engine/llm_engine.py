"""The engine: requests in, outputs out, one continuous-batching step at a time.

`step()` = schedule → execute → update: the scheduler decides the batch, the model
runner computes it and samples, the scheduler records the tokens, and the output
processor turns them into text. Requests join and leave every step.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pagedllm.allocator import release_free_memory
from pagedllm.config import EngineArgs
from pagedllm.core.invariants import debug_invariants_enabled, require
from pagedllm.core.sched_output import SchedulerOutput
from pagedllm.core.scheduler import Scheduler
from pagedllm.engine.beam_search import BeamSearchDriver
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.step_stats import StepStats
from pagedllm.kv_transfer.blocks import fingerprint
from pagedllm.kv_transfer.connector import ThreadedConnector
from pagedllm.kv_transfer.offload import OffloadConnector
from pagedllm.kv_transfer.remote import KVConsumer, KVProducer
from pagedllm.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from pagedllm.pooling_params import PoolingParams
from pagedllm.request import Request, RequestStatus
from pagedllm.sample.grammar import GrammarCompiler, GrammarMatchers
from pagedllm.sampling_params import MAX_STOP_TOKEN_IDS, BeamSearchParams, SamplingParams
from pagedllm.spec_decode import (
    DraftModelProposer,
    NgramProposer,
    Proposer,
    SpecDecodeStats,
)
from pagedllm.spec_decode.stats import ACCEPTED_PER_POSITION
from pagedllm.tokenizer import load_tokenizer
from pagedllm.worker.executor import make_executor
from pagedllm.worker.model_runner import SampledRow
from pagedllm.worker.worker import resolve_device, resolve_dtype, usable_cores

__all__ = ["LLMEngine", "PromptType", "resolve_device", "resolve_dtype", "usable_cores"]

logger = logging.getLogger(__name__)


PromptType = str | list[int] | dict[str, Any]


@dataclass
class _Failed:
    outputs: list[RequestOutput]  # final outputs, each with its error
    sequence_ids: set[str]


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and every live request."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        # the model, its KV cache and the runner live in the workers (rank 0 here)
        self.executor = make_executor(args)
        try:
            self._build(args)
        except BaseException:
            connector = getattr(self, "kv_connector", None)
            if connector is not None:  # its threads, its port
                connector.close()
            self.executor.close()  # the other ranks too
            raise
        release_free_memory()  # what loading freed: ~45 MB resident for the default model

    def _build(self, args: EngineArgs) -> None:
        worker = self.executor.driver
        self.device, self.dtype = worker.device, worker.dtype
        self.model_path = path = worker.model_path
        self.model = worker.model
        self.model_config = config = self.model.config
        self.tokenizer = load_tokenizer(path)
        self.max_model_len = worker.max_model_len
        self.kv_cache_dtype = worker.kv_cache_dtype
        draft_model, draft_caches = worker.draft_model, worker.draft_caches
        windows = worker.windows
        self.num_blocks = num_blocks = worker.num_blocks
        kv_caches = worker.kv_caches
        self.kv_connector = self._kv_connector(path, windows, kv_caches + draft_caches)
        self.scheduler = Scheduler(
            args.scheduler_config(self.max_model_len),
            args.cache_config(num_blocks),
            num_blocks,
            windows,
            kv_connector=self.kv_connector,
        )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB) in %s, %d layer group(s) (%s); "
            "one sequence can hold %d tokens",
            num_blocks,
            args.block_size,
            num_blocks * worker.block_bytes / 2**20,
            str(self.kv_cache_dtype).removeprefix("torch."),
            len(windows),
            ", ".join("full" if w is None else f"window {w}" for w in windows),
            self.scheduler.default_max_len - 1,
        )
        self.runner = worker.runner
        tokenizer = self.tokenizer
        self.runner.grammars = GrammarMatchers(
            GrammarCompiler(
                tokenizer.hf,
                config.vocab_size,
                [tokenizer.eos_token_id, *tokenizer.end_of_turn_ids],
            )
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.beams = BeamSearchDriver(self.scheduler, tokenizer, config.vocab_size)
        self._ids = itertools.count()
        # n > 1 requests not yet forked: their parameters
        self._pending_fork: dict[str, SamplingParams] = {}
        self._embeddings: dict[str, list[int]] = {}  # live embedding requests: their prompts
        self.pooling = args.pooling if args.pooling != "auto" else config.pooling_type or "last"
        self.generation_tokens_total = 0
        self.step_stats = StepStats()
        self.proposer: Proposer | None = None
        if draft_model is not None:
            assert args.speculative is not None
            self.proposer = DraftModelProposer(
                args.speculative, draft_model, draft_caches, args.block_size, self.device
            )
        elif args.speculative is not None:
            self.proposer = NgramProposer(args.speculative)
        # a draft model drafts inside the step, on rank 0 (config refuses one under TP)
        self.runner.proposer = self.proposer
        self.spec_stats = SpecDecodeStats()
        # PAGEDLLM_DEBUG_INVARIANTS=1: re-check the bookkeeping after every step and abort.
        self.debug_invariants = debug_invariants_enabled()

    def _kv_connector(
        self, path: str, windows: list[int | None], caches: list
    ) -> ThreadedConnector | None:
        """The host/disk tiers of --kv-offload or the producer/consumer of
        --kv-transfer-config, when asked for."""
        args = self.args
        if args.kv_offload_config is None and args.kv_transfer is None:
            return None
        if len(windows) > 1:
            raise ValueError(
                "kv_offload and kv_transfer_config need a model with one KV-cache layer "
                "group; this one has sliding-window layers beside full-attention ones"
            )
        draft = args.speculative.model if args.speculative is not None else None
        identity = (
            str(self.dtype),
            str(self.kv_cache_dtype),
            args.block_size,
            args.exact_matmul,
            draft,
        )
        fp = fingerprint(path, caches, *identity)
        if args.kv_offload_config is not None:
            return OffloadConnector(args.kv_offload_config, caches, fp)
        assert args.kv_transfer is not None
        if args.kv_transfer.kv_role == "kv_producer":
            return KVProducer(args.kv_transfer, caches, fp)
        return KVConsumer(args.kv_transfer, caches, fp)

    def kv_transfer_params(self) -> dict[str, Any] | None:
        """What a prefill instance's responses tell the router (its KV server's address)."""
        connector = self.kv_connector
        return connector.transfer_params() if isinstance(connector, KVProducer) else None

    def close(self) -> None:
        """Finish background work: pending KV loads, disk writes, the KV server, the
        other tensor-parallel ranks."""
        if self.kv_connector is not None:
            self.kv_connector.close()
        self.executor.close()

    # ------------------------------------------------------------------ intake

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Text or token ids of a prompt, checked: never empty, ids inside the vocabulary."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple):
            ids = list(prompt)
            if not ids:
                raise ValueError("prompt_token_ids must not be empty")
            vocab = self.model_config.vocab_size
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(
                        f"prompt_token_ids must be integers in [0, {vocab}), got {t!r}"
                    )
            return None, ids
        raise ValueError(
            f"prompt must be a string, token ids or a dict, got {type(prompt).__name__}"
        )

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams | BeamSearchParams,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request (generation, an embedding for PoolingParams, a beam search for
        BeamSearchParams); a ValueError says what is wrong and nothing is kept."""
        if self._in_use(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(params, PoolingParams):
            self._add_embedding(request_id, prompt, params, arrival_time, priority)
            return
        if isinstance(params, BeamSearchParams):
            self._add_beam_search(request_id, prompt, params, arrival_time, priority)
            return
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams")
        text, ids = self.tokenize_prompt(prompt)
        if params.structured_outputs is not None:  # refused here if it does not compile
            assert self.runner.grammars is not None
            self.runner.grammars.compiler.compile(params.structured_outputs)
        params = self._with_end_of_turn_stops(
            params.within_vocabulary(self.model_config.vocab_size)
        )
        request = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling_params=params,
            eos_token_id=self.tokenizer.eos_token_id,
            arrival_time=arrival_time or time.monotonic(),
            priority=priority,
        )
        self.scheduler.add_request(request)  # raises for requests that can never fit
        self.output_processor.add_request(request, text, request.arrival_time)
        if params.n > 1:
            self._pending_fork[request_id] = params

    def _add_embedding(
        self,
        request_id: str,
        prompt: PromptType,
        params: PoolingParams,
        arrival_time: float | None,
        priority: int,
    ) -> None:
        """An embedding request: its prompt prefilled in the same steps as generation,
        pooled, and ended with its last chunk (one token of room, never sampled)."""
        _, ids = self.tokenize_prompt(prompt)
        request = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling_params=SamplingParams(max_tokens=1),
            arrival_time=arrival_time or time.monotonic(),
            priority=priority,
            pooling=params.pooling or self.pooling,
            pooling_normalize=params.normalize,
        )
        self.scheduler.add_request(request)
        self._embeddings[request_id] = ids

    def _add_beam_search(
        self,
        request_id: str,
        prompt: PromptType,
        params: BeamSearchParams,
        arrival_time: float | None,
        priority: int,
    ) -> None:
        """A beam search: its beams run in the same steps as every other request
        (`pagedllm.engine.beam_search`); its one output comes when it ends."""
        if self.proposer is not None:
            raise ValueError(
                "beam search does not run with speculative decoding: start the engine "
                "without speculative_config"
            )
        text, ids = self.tokenize_prompt(prompt)
        self.beams.add(request_id, text, ids, params, arrival_time or time.monotonic(), priority)

    def _in_use(self, request_id: str) -> bool:
        return (
            request_id in self._embeddings
            or request_id in self.beams
            or bool(self.output_processor.sequence_ids(request_id))
        )

    def _with_end_of_turn_stops(self, params: SamplingParams) -> SamplingParams:
        """Stop at the model's end-of-turn tokens too (Gemma's <end_of_turn>, Llama 3's
        <|eot_id|>), as at EOS: a chat model ends its answer with one of them."""
        extra = [t for t in self.tokenizer.end_of_turn_ids if t not in params.stop_token_ids]
        room = MAX_STOP_TOKEN_IDS - len(params.stop_token_ids)
        if not extra or params.ignore_eos or room < len(extra):
            return params
        return params.clone(stop_token_ids=[*params.stop_token_ids, *extra])

    def abort_request(self, request_ids: str | Sequence[str]) -> list[RequestOutput]:
        """End requests now and free every block they hold."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = [out for user_id in request_ids if (out := self._end(user_id)) is not None]
        if self.debug_invariants:
            self.check_invariants()
        return outputs

    def _end(
        self, user_id: str, error: str | None = None
    ) -> RequestOutput | EmbeddingRequestOutput | None:
        """Abort every sequence of a user request; its final output carries `error`."""
        if user_id in self.beams:
            return self.beams.abort(user_id, error)
        if user_id in self._embeddings:
            self.scheduler.finish_requests([user_id], RequestStatus.FINISHED_ABORTED)
            ids = self._embeddings.pop(user_id)
            return EmbeddingRequestOutput(user_id, ids, EmbeddingOutput([]), error=error)
        seq_ids = self.output_processor.sequence_ids(user_id)
        self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
        if self.proposer is not None:
            self.proposer.release(seq_ids)
        self._pending_fork.pop(user_id, None)
        return self.output_processor.abort(user_id, error=error)

    def _fail_requests(self, errors: dict[str, str]) -> _Failed:
        """End the requests whose output processing raised; the others are untouched."""
        failed = _Failed([], set())
        for user_id, error in errors.items():
            failed.sequence_ids.update(self.output_processor.sequence_ids(user_id))
            out = self._end(user_id, error)
            if out is not None:
                failed.outputs.append(out)
        return failed

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """One iteration of continuous batching; returns the outputs that changed."""
        start = time.perf_counter()
        scheduler = self.scheduler
        sched = scheduler.schedule()
        connector = self.kv_connector
        if connector is not None:
            connector.start(sched.kv_saves, sched.kv_loads)
        if sched.is_empty and self.beams.unstick():
            # beams waiting for their siblings gave up their blocks; the workers still
            # hear of the step's finished and preempted requests
            self.executor.execute(sched)
            return []
        self.step_stats.observe_schedule(scheduler)
        scheduled_at = time.perf_counter()
        # Everything the step needs is in `sched` now: between here and the update the
        # engine reads nothing of the scheduler's (a worker may be another process).
        sched.num_samples = {
            s.request_id: self._pending_fork[s.request_id].n
            for s in sched.scheduled_requests
            if s.samples and s.request_id in self._pending_fork
        }
        result = self.executor.execute(sched)
        executed_at = time.perf_counter()
        sampled = result.sampled
        self.generation_tokens_total += sum(len(r.token_ids) for r in sampled.values())
        forks = {
            parent_id: self._split_first_draws(parent_id, sampled)
            for parent_id in sched.num_samples
        }
        beam_tokens = self.beams.take(sampled)
        # a stop (or max_tokens) inside accepted drafts cuts a row's tokens there
        finished = scheduler.update_from_output(
            sched, {rid: row.token_ids for rid, row in sampled.items()} | beam_tokens, forks
        )
        for row in sampled.values():
            row.keep(len(row.token_ids))
        if connector is not None:  # the step's new blocks are saved now, not next step
            connector.start(scheduler.take_kv_saves(), [])
            scheduler.finish_kv_loads(connector.poll(wait_for_one=sched.is_empty))
        beam_outputs = self.beams.apply()
        finished_by_id = {r.request_id: r for r in finished}
        processed = self.output_processor.process(
            sampled,
            scheduler.requests,
            finished_by_id,
            [s.request_id for s in sched.scheduled_requests],
            result.prompt_logprobs,
        )
        outputs, stopped = processed.outputs + beam_outputs, processed.stopped_by_string
        for request_id, vector in result.embeddings.items():
            ids = self._embeddings.pop(request_id)
            outputs.append(EmbeddingRequestOutput(request_id, ids, EmbeddingOutput(vector)))  # type: ignore[arg-type]
        if processed.failed:
            gone = self._fail_requests(processed.failed)
            outputs += gone.outputs
            stopped = [s for s in stopped if s not in gone.sequence_ids]
        if stopped:
            for r in scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED):
                r.stop_reason = "stop string"
        if self.proposer is not None:
            self._speculate(sched, sampled, [*finished_by_id, *stopped])
        self.step_stats.add_step(start, scheduled_at, executed_at, time.perf_counter())
        if self.debug_invariants:
            self.check_invariants()
        return outputs

    def _speculate(
        self, sched: SchedulerOutput, sampled: dict[str, SampledRow], ended: list[str]
    ) -> None:
        """Count the step's verified drafts, then draft for the next step."""
        assert self.proposer is not None
        for s in sched.scheduled_requests:
            if s.num_draft_tokens and s.request_id in sampled:
                accepted = len(sampled[s.request_id].token_ids) - 1
                self.spec_stats.observe(s.num_draft_tokens, accepted)
                self.proposer.observe(s.request_id, s.num_draft_tokens, accepted)
        self.proposer.release(ended)
        self.proposer.propose(self.scheduler.running)

    def check_invariants(self) -> None:
        """Raise InvariantError unless the scheduler, its blocks and the runner agree."""
        self.scheduler.check_invariants()
        live = self.scheduler.requests
        # the runner forgets finished requests when the next step tells it
        told = self.scheduler.finished_req_ids
        stale = [
            rid for rid in self.runner.live_request_ids() if rid not in live and rid not in told
        ]
        require(not stale, f"the model runner keeps state for finished requests {stale}")
        stale = [rid for rid in self.beams.live_request_ids() if rid not in live]
        require(not stale, f"beam searches name finished requests as live beams {stale}")
        if self.proposer is not None:
            stale = [rid for rid in self.proposer.live_request_ids() if rid not in live]
            require(not stale, f"the proposer keeps state for finished requests {stale}")

    def _split_first_draws(
        self, parent_id: str, sampled: dict[str, SampledRow]
    ) -> list[tuple[str, int, SamplingParams]]:
        """An n > 1 request's first draws, one per sequence: the parent keeps the first,
        each child (forked by the scheduler's update) one of the rest."""
        params = self._pending_fork.pop(parent_id)
        row = sampled[parent_id]
        children = []
        for i in range(1, params.n):
            child_id = f"{parent_id}#{i}"
            children.append((child_id, row.token_ids[i], _child_params(params, i)))
            self.output_processor.add_sequence(parent_id, child_id, i)
            sampled[child_id] = SampledRow(
                [row.token_ids[i]], None if row.logprobs is None else [row.logprobs[i]]
            )
        sampled[parent_id] = SampledRow(
            row.token_ids[:1], None if row.logprobs is None else row.logprobs[:1]
        )
        return children

    # ----------------------------------------------------------------- metrics

    def get_metrics(self) -> dict[str, float]:
        """Counters and gauges under the names the server exports (without the prefix)."""
        stats = self.scheduler.stats
        return {
            "num_requests_running": stats.num_running,
            "num_requests_waiting": stats.num_waiting,
            "kv_cache_usage_perc": stats.kv_cache_usage,
            "prefix_cache_queries": stats.prefix_cache_queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
            "num_preemptions_total": stats.num_preemptions_total,
            "prompt_tokens_total": self.scheduler.num_prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "num_kv_blocks": self.num_blocks,
            "num_free_kv_blocks": self.scheduler.kv_cache_manager.get_num_free_blocks(),
            "spec_decode_num_drafts": self.spec_stats.num_drafts,
            "spec_decode_num_draft_tokens": self.spec_stats.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.spec_stats.num_accepted_tokens,
            **(self.kv_connector.metrics() if self.kv_connector is not None else {}),
            **{
                f"{ACCEPTED_PER_POSITION}{i}": count
                for i, count in enumerate(self.spec_stats.accepted_per_position)
            },
        }


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """An n > 1 request's `index`-th child's parameters: a seeded parent's children draw
    from streams of their own, derived from its seed and their index."""
    if params.seed is None:
        return params
    return params.clone(seed=(params.seed % 2**64 * 1_000_003 + index) % 2**63)
