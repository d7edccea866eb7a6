"""AsyncLLM over a scripted engine: deltas, abort, errors, fault isolation, a free event loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from pagedllm.core.scheduler import QueueFullError
from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
from pagedllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedllm.sampling_params import SamplingParams


@dataclass
class _Live:
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.monotonic()))


class ScriptedEngine:
    """Stands in for LLMEngine: every step gives each request one token, `k` → text "tk "."""

    def __init__(self, max_live: int | None = None, step_delay: float = 0.0) -> None:
        self.tokenizer = None
        self.max_model_len = 100
        self.live: dict[str, _Live] = {}
        self.max_live = max_live
        self.step_delay = step_delay
        self.fail_next_step = False

    def tokenize_prompt(self, prompt):
        return None, list(prompt)

    def close(self) -> None:
        self.closed = True

    def add_request(self, request_id, prompt, params: SamplingParams) -> None:
        if prompt == "bad":
            raise ValueError("prompt is bad")
        if self.max_live is not None and len(self.live) >= self.max_live:
            raise QueueFullError("the queue is full")
        self.live[request_id] = _Live(params.max_tokens or 5)

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_delay)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outputs = []
        for request_id, live in list(self.live.items()):
            live.tokens.append(len(live.tokens))
            done = len(live.tokens) == live.max_tokens
            outputs.append(self._output(request_id, live, "length" if done else None))
            if done:
                del self.live[request_id]
        return outputs

    def abort_request(self, request_ids) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else request_ids
        return [self._output(i, self.live.pop(i), "abort") for i in ids if i in self.live]

    def get_metrics(self) -> dict[str, float]:
        return {"num_requests_running": len(self.live), "kv_cache_usage_perc": len(self.live) / 8}

    @staticmethod
    def _output(request_id: str, live: _Live, finish_reason: str | None) -> RequestOutput:
        text = "".join(f"t{t} " for t in live.tokens)
        completion = CompletionOutput(0, text, list(live.tokens), None, None, finish_reason)
        return RequestOutput(
            request_id, None, [1], [completion], finish_reason is not None, live.metrics
        )


def run(engine: ScriptedEngine, scenario) -> None:
    llm = AsyncLLM(engine)  # type: ignore[arg-type]
    try:
        asyncio.run(asyncio.wait_for(scenario(llm), 20))
    finally:
        llm.shutdown()


def until(predicate, timeout: float = 5.0):
    async def wait() -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    return wait()


def test_deltas_concatenate_to_the_full_output():
    async def scenario(llm: AsyncLLM) -> None:
        deltas = [d async for d in llm.generate("a", [1, 2], SamplingParams(max_tokens=5))]
        assert [len(d.outputs[0].token_ids) for d in deltas] == [1] * 5
        assert "".join(d.outputs[0].text for d in deltas) == "t0 t1 t2 t3 t4 "
        assert [d.finished for d in deltas] == [False] * 4 + [True]
        assert deltas[-1].outputs[0].finish_reason == "length"

    run(ScriptedEngine(), scenario)


def test_concurrent_requests_each_get_their_own_stream():
    async def one(llm: AsyncLLM, request_id: str, n: int) -> str:
        params = SamplingParams(max_tokens=n)
        return "".join([d.outputs[0].text async for d in llm.generate(request_id, [1], params)])

    async def scenario(llm: AsyncLLM) -> None:
        texts = await asyncio.gather(*(one(llm, str(i), i + 1) for i in range(6)))
        assert texts == ["".join(f"t{t} " for t in range(i + 1)) for i in range(6)]

    run(ScriptedEngine(), scenario)


def test_abort_ends_the_stream_and_frees_the_request():
    engine = ScriptedEngine(step_delay=0.01)

    async def scenario(llm: AsyncLLM) -> None:
        stream = await llm.add_request("a", [1], SamplingParams(max_tokens=1000))
        await stream.__anext__()
        llm.abort("a")
        rest = [d async for d in stream]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        assert not engine.live
        await until(lambda: llm.stats["num_requests_running"] == 0)

    run(engine, scenario)


def test_leaving_generate_early_aborts_the_request():
    engine = ScriptedEngine(step_delay=0.01)

    async def scenario(llm: AsyncLLM) -> None:
        stream = llm.generate("a", [1], SamplingParams(max_tokens=1000))
        async for _ in stream:
            break
        await stream.aclose()
        await until(lambda: not engine.live)

    run(engine, scenario)


def test_refusals_reach_the_caller_and_keep_nothing():
    engine = ScriptedEngine(max_live=1, step_delay=0.01)

    async def scenario(llm: AsyncLLM) -> None:
        with pytest.raises(ValueError, match="prompt is bad"):
            await llm.add_request("a", "bad", SamplingParams())
        await llm.add_request("b", [1], SamplingParams(max_tokens=1000))
        with pytest.raises(QueueFullError):
            await llm.add_request("c", [1], SamplingParams())
        assert list(engine.live) == ["b"]
        llm.abort("b")

    run(engine, scenario)


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on():
    engine = ScriptedEngine(step_delay=0.01)

    async def scenario(llm: AsyncLLM) -> None:
        stream = await llm.add_request("a", [1], SamplingParams(max_tokens=1000))
        await stream.__anext__()
        engine.fail_next_step = True
        with pytest.raises(RequestFailedError, match="boom"):
            async for _ in stream:
                pass
        assert not engine.live  # the failed request was aborted, its resources freed
        deltas = [d async for d in llm.generate("b", [1], SamplingParams(max_tokens=3))]
        assert deltas[-1].finished and llm.is_running

    run(engine, scenario)


def test_the_step_loop_does_not_block_the_event_loop():
    engine = ScriptedEngine(step_delay=0.2)  # a slow step, like a big batch on a CPU

    async def scenario(llm: AsyncLLM) -> None:
        stream = await llm.add_request("a", [1], SamplingParams(max_tokens=5))
        worst = 0.0
        for _ in range(50):
            start = time.monotonic()
            await asyncio.sleep(0.01)
            worst = max(worst, time.monotonic() - start)
        assert worst < 0.15  # ticks run while steps are in flight
        assert [d async for d in stream][-1].finished

    run(engine, scenario)


def test_shutdown_fails_live_streams_and_refuses_new_requests():
    engine = ScriptedEngine(step_delay=0.01)

    async def scenario(llm: AsyncLLM) -> None:
        stream = await llm.add_request("a", [1], SamplingParams(max_tokens=1000))
        await stream.__anext__()
        await asyncio.to_thread(llm.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await llm.add_request("b", [1], SamplingParams())
        assert not llm.is_running and not engine.live

    run(engine, scenario)


def test_a_cancelled_add_is_aborted():
    engine = ScriptedEngine(step_delay=0.05)

    async def scenario(llm: AsyncLLM) -> None:
        first = await llm.add_request("a", [1], SamplingParams(max_tokens=1000))
        task = asyncio.ensure_future(llm.add_request("b", [1], SamplingParams(max_tokens=1000)))
        await asyncio.sleep(0)  # the add is queued; the engine is mid-step
        task.cancel()
        llm.abort(first.request_id)
        await until(lambda: not engine.live)

    run(engine, scenario)


def test_a_request_failed_in_the_engine_fails_its_stream_alone():
    engine = ScriptedEngine(step_delay=0.01)
    real_step = engine.step

    def step() -> list[RequestOutput]:
        outputs = real_step()
        for out in outputs:
            if out.request_id == "bad" and "bad" in engine.live:
                del engine.live["bad"]
                out.finished, out.error = True, "processing the output failed: boom"
        return outputs

    engine.step = step  # type: ignore[method-assign]

    async def scenario(llm: AsyncLLM) -> None:
        bad = await llm.add_request("bad", [1], SamplingParams(max_tokens=1000))
        good = await llm.add_request("good", [1], SamplingParams(max_tokens=3))
        with pytest.raises(RequestFailedError, match="boom"):
            async for _ in bad:
                pass
        assert [d async for d in good][-1].finished and llm.is_running

    run(engine, scenario)


def test_an_invariant_violation_stops_the_engine():
    from pagedllm.core.invariants import InvariantError

    engine = ScriptedEngine(step_delay=0.01)

    def step() -> list[RequestOutput]:
        raise InvariantError("block 3 has ref_cnt 2 but is held by 1 block tables")

    engine.step = step  # type: ignore[method-assign]

    async def scenario(llm: AsyncLLM) -> None:
        stream = await llm.add_request("a", [1], SamplingParams(max_tokens=5))
        with pytest.raises(InvariantError, match="ref_cnt 2"):
            async for _ in stream:
                pass
        await until(lambda: not llm.is_running)
        assert isinstance(llm.dead_error, InvariantError)
        with pytest.raises(EngineDeadError, match="ref_cnt 2"):
            await llm.add_request("b", [1], SamplingParams())

    run(engine, scenario)


def test_deltas_a_slow_reader_has_not_read_are_merged_into_one():
    from pagedllm.engine.async_llm import CompletionDelta, RequestDelta, RequestStream

    async def scenario() -> None:
        stream = RequestStream("r", asyncio.get_running_loop())
        metrics = RequestMetrics(time.monotonic())
        for step in range(1000):
            outputs = [CompletionDelta(i, f"{step},", [step], [{step: None}]) for i in (0, 1)]
            last = step == 999
            if last:
                outputs[1].finish_reason = "length"
            stream.put(RequestDelta("r", outputs, last, [1, 2], 0, metrics))
        assert stream.num_unread == 1000
        merged = [d async for d in stream]
        assert len(merged) == 1 and merged[0].finished and stream.num_unread == 0
        c0, c1 = merged[0].outputs
        assert c0.text == "".join(f"{k}," for k in range(1000)) == c1.text
        assert c0.token_ids == list(range(1000)) and len(c1.logprobs) == 1000
        assert (c0.finish_reason, c1.finish_reason) == (None, "length")

    asyncio.run(scenario())


def test_an_error_after_unread_deltas_comes_after_them():
    from pagedllm.engine.async_llm import CompletionDelta, RequestDelta, RequestStream

    async def scenario() -> None:
        stream = RequestStream("r", asyncio.get_running_loop())
        delta = RequestDelta("r", [CompletionDelta(0, "a", [1], None)], False, [1], 0, None)
        stream.put(delta)
        stream.put(RequestFailedError("boom"))
        assert (await anext(stream)).outputs[0].text == "a"
        with pytest.raises(RequestFailedError):
            await anext(stream)
        with pytest.raises(StopAsyncIteration):
            await anext(stream)

    asyncio.run(scenario())
