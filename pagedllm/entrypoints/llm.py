"""The offline API, as vLLM's `LLM`: generate and chat over many prompts at once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from pagedllm.config import EngineArgs
from pagedllm.engine.llm_engine import LLMEngine, PromptType
from pagedllm.outputs import (
    BeamSearchOutput,
    BeamSearchSequence,
    EmbeddingRequestOutput,
    RequestOutput,
)
from pagedllm.pooling_params import PoolingParams
from pagedllm.sample.beam_search import beam_score
from pagedllm.sampling_params import BeamSearchParams, SamplingParams
from pagedllm.tokenizer import Message


class LLM:
    """An engine for offline batches: `LLM(model=None, **engine_args)`; None = the default model."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        known = {f.name for f in fields(EngineArgs)}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ValueError(f"unknown engine arguments {unknown}; known: {sorted(known)}")
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the prompts' order.

        A prompt is a string or {"prompt_token_ids": [...]}; `sampling_params` is one
        object for all prompts or one per prompt. Every prompt is checked before any
        runs, so a bad one raises ValueError and nothing is queued.
        """
        prompts = _as_prompt_list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        for prompt in prompts:  # validate all before queueing any
            self.engine.tokenize_prompt(prompt)
        return self._run(prompts, params, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Reply to one conversation or a list of them, rendered with the chat template
        (`chat_template_kwargs`: more variables for it, as vLLM's)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts: list[PromptType] = []
        for conversation in conversations:
            if not conversation:
                raise ValueError("messages must not be empty")
            text = self.engine.tokenizer.apply_chat_template(
                conversation,  # type: ignore[arg-type]
                add_generation_prompt,
                extra_variables=chat_template_kwargs,
            )
            prompts.append(
                {
                    "prompt_token_ids": self.engine.tokenizer.encode(
                        text, add_special_tokens=False
                    ),
                    "prompt": text,
                }
            )
        params = self._params_per_prompt(sampling_params, len(prompts))
        outputs = self._run(prompts, params, use_tqdm)
        for output, prompt in zip(outputs, prompts, strict=True):
            output.prompt = prompt["prompt"]  # type: ignore[index]
        return outputs

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """Beam search over each prompt; per prompt, up to beam_width sequences, best first.

        Beams stay resident in the engine, run in its continuous batch and share KV
        blocks (see `pagedllm.engine.beam_search`); each sequence carries its generated
        `tokens`, `text`, `cum_logprob` and length-penalised `score`.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError("params must be a BeamSearchParams")
        prompts = _as_prompt_list(prompts)
        for prompt in prompts:  # validate all before queueing any
            self.engine.tokenize_prompt(prompt)
        outputs = self._run(prompts, [params] * len(prompts), use_tqdm)
        return [_beam_search_output(output, params) for output in outputs]

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """The embedding of every prompt (`outputs.embedding`), in the prompts' order.

        The prompts run through the same scheduler and steps as generation (prefill
        only); pooling is `pooling_params.pooling`, else the engine's `pooling`."""
        prompts = _as_prompt_list(prompts)
        for prompt in prompts:  # validate all before queueing any
            self.engine.tokenize_prompt(prompt)
        params = [pooling_params or PoolingParams()] * len(prompts)
        return self._run(prompts, params, use_tqdm)  # type: ignore[arg-type,return-value]

    def get_metrics(self) -> dict[str, float]:
        """The engine's counters and gauges, named as the server exports them."""
        return self.engine.get_metrics()

    def close(self) -> None:
        """Finish background work: a KV connector's loads and disk writes, and close its
        KV server (a producer's port). `with LLM(...) as llm:` calls it on the way out."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------

    @staticmethod
    def _params_per_prompt(
        params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
        return params

    def _run(
        self,
        prompts: list[PromptType],
        params: Sequence[SamplingParams | BeamSearchParams],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                    prompt = {"prompt_token_ids": prompt["prompt_token_ids"]}
                request_id = engine.new_request_id()
                engine.add_request(request_id, prompt, p)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)  # a refused prompt leaves nothing queued
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(
            total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True
        )
        start = time.monotonic()
        prompt_tokens = output_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        prompt_tokens += len(output.prompt_token_ids)
                        if isinstance(output, RequestOutput):
                            output_tokens += sum(len(c.token_ids) for c in output.outputs)
                        elapsed = max(time.monotonic() - start, 1e-9)
                        bar.set_postfix_str(
                            f"input: {prompt_tokens / elapsed:.1f} toks/s, "
                            f"output: {output_tokens / elapsed:.1f} toks/s"
                        )
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in results])
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (text, token ids or a dict) or a list of them, as a list."""
    if isinstance(prompts, str | dict) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def _beam_search_output(output: RequestOutput, params: BeamSearchParams) -> BeamSearchOutput:
    """A finished search's request output as `LLM.beam_search` answers: with scores."""
    sequences = [
        BeamSearchSequence(
            tokens=c.token_ids,
            text=c.text,
            cum_logprob=c.cumulative_logprob or 0.0,
            score=beam_score(
                len(c.token_ids),
                c.cumulative_logprob or 0.0,
                params.length_penalty,
                c.finish_reason == "stop",
            ),
            finish_reason=c.finish_reason,
        )
        for c in output.outputs
    ]
    return BeamSearchOutput(sequences, output.prompt, output.prompt_token_ids)
