"""Cumulative time in the model's forward passes and LM head, for the benchmarks' step breakdown."""

from __future__ import annotations

import time

import torch


class ForwardTimer:
    """A context manager around each forward; `total()` is the seconds spent inside.

    On CUDA the forward is bracketed by events and read later, once a following
    synchronisation (the sampler's `.tolist()`) has passed them, so timing adds no
    synchronisation of its own. On the CPU it is wall-clock time.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._seconds = 0.0
        self._start: float | torch.cuda.Event = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __enter__(self) -> ForwardTimer:
        if self._cuda:
            self._drain(wait=False)
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))
            self._start = start
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        start = self._start
        if isinstance(start, float):
            self._seconds += time.perf_counter() - start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self._pending.append((start, end))

    def _drain(self, wait: bool) -> None:
        done = 0
        for start, end in self._pending:
            if wait:
                end.synchronize()
            elif not end.query():
                break
            self._seconds += start.elapsed_time(end) / 1e3
            done += 1
        del self._pending[:done]

    def total(self) -> float:
        """Seconds inside every forward so far (waits for forwards still on the GPU)."""
        self._drain(wait=True)
        return self._seconds

    def reset(self) -> None:
        self._drain(wait=True)
        self._seconds = 0.0
