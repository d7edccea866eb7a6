"""How the engine reaches its workers: in this process, or one process per
tensor-parallel rank over torch.distributed.

Rank 0 (the driver) always runs in the engine's process and returns the step's
result; each other rank runs in a process of its own, receives every step's
SchedulerOutput as a broadcast and computes its share of the same forward pass (the
collectives inside the model keep the ranks in step). A rank that dies is noticed on
the next step, or inside the one in flight when a collective finds its socket closed,
and fails the engine with WorkerDiedError instead of hanging it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist

from pagedllm.config import EngineArgs
from pagedllm.core.sched_output import SchedulerOutput
from pagedllm.model.parallel import CollectiveError
from pagedllm.worker.model_runner import RunnerOutput
from pagedllm.worker.worker import Worker, init_distributed, resolve_device

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank is gone: the engine cannot run another step."""


class Executor:
    """Runs each step on every rank and returns rank 0's result (here: one rank, in-process)."""

    def __init__(self, args: EngineArgs) -> None:
        self.driver = Worker(args)

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        return self.driver.execute(output)

    def close(self) -> None:
        """Stop the other ranks (nothing to stop in-process)."""


class MultiprocExecutor(Executor):
    """Rank 0 here; ranks 1 to N - 1 in processes it spawns or, under `torchrun` (RANK and
    WORLD_SIZE set), in the processes torchrun started, on this machine or others.
    Every step goes to them as one broadcast over torch.distributed."""

    def __init__(self, args: EngineArgs) -> None:
        size = args.tensor_parallel_size
        device = resolve_device(args.device)
        self.processes: list[BaseProcess] = []
        self.steps: dist.ProcessGroup | None = None
        self._running = False  # the ranks are in their step loops: close() tells them
        if dist.is_initialized():  # torch.distributed has one default group a process
            raise RuntimeError(
                "another tensor-parallel engine runs in this process: close it first"
            )
        try:
            if _launched_by_torchrun(size):
                self.steps = _join_torchrun(args, size)
            else:
                self.steps = self._spawn(args, size, device)
            self.driver = Worker(args, 0, size)
            self._running = True
        except BaseException:
            self.close()
            raise

    def _spawn(self, args: EngineArgs, size: int, device: torch.device) -> dist.ProcessGroup:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = multiprocessing.get_context("spawn")
        for rank in range(1, size):
            process = context.Process(
                target=_spawned_worker,
                args=(args, rank, size, init_method),
                name=f"pagedllm-tp{rank}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)
        return init_distributed(0, size, init_method, device, local_rank=0)

    def _died(self) -> WorkerDiedError:
        gone = [
            f"rank {rank} (exit code {p.exitcode})"
            for rank, p in enumerate(self.processes, start=1)
            if not p.is_alive()
        ]
        return WorkerDiedError(
            f"tensor-parallel worker {', '.join(gone) or 'process'} died; restart the engine"
        )

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        if not all(p.is_alive() for p in self.processes):
            raise self._died()
        try:
            dist.broadcast_object_list([output], src=0, group=self.steps)
        except RuntimeError as e:
            raise self._died() from e
        try:
            return self.driver.execute(output)
        except CollectiveError as e:  # the ranks are out of step for good
            raise self._died() from e
        except Exception as e:
            if not all(p.is_alive() for p in self.processes):
                raise self._died() from e
            if not self.driver.runner.collectives_done:
                # the other ranks wait in a collective rank 0 never reached: no later
                # step could pair its collectives with theirs
                raise WorkerDiedError(
                    f"rank 0 failed inside a tensor-parallel step ({type(e).__name__}: {e}); "
                    "the ranks are out of step: restart the engine"
                ) from e
            raise  # after the last collective: rank 0's error fails only the step

    def close(self) -> None:
        if dist.is_initialized():
            if self._running and all(p.is_alive() for p in self.processes):
                with contextlib.suppress(RuntimeError):
                    dist.broadcast_object_list([None], src=0, group=self.steps)
            dist.destroy_process_group()
        self._running = False
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        self.processes = []


def make_executor(args: EngineArgs) -> Executor:
    """One rank in-process, or a rank per process. Under `torchrun`, a process other than
    rank 0 becomes a worker here and exits when the engine stops: every rank runs the
    same command, and only rank 0's serves."""
    size = args.tensor_parallel_size
    if size == 1:
        return Executor(args)
    if _launched_by_torchrun(size) and int(os.environ["RANK"]) != 0:
        steps = _join_torchrun(args, size)
        run_worker(Worker(args, int(os.environ["RANK"]), size), steps)
        raise SystemExit(0)
    return MultiprocExecutor(args)


def run_worker(worker: Worker, steps: dist.ProcessGroup) -> None:
    """A rank other than 0: run every step rank 0 broadcasts until it sends None."""
    while True:
        box: list[SchedulerOutput | None] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=steps)
        except RuntimeError:  # rank 0 is gone
            return
        if box[0] is None:
            return
        worker.execute(box[0])


def _spawned_worker(args: EngineArgs, rank: int, size: int, init_method: str) -> None:
    steps = init_distributed(rank, size, init_method, resolve_device(args.device), rank)
    run_worker(Worker(args, rank, size), steps)
    dist.destroy_process_group()


def _launched_by_torchrun(size: int) -> bool:
    """Whether torchrun (or the user: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) started
    this process as one of `size` ranks."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(
            f"WORLD_SIZE is {world} but tensor_parallel_size is {size}: start one process per rank"
        )
    return True


def _join_torchrun(args: EngineArgs, size: int) -> dist.ProcessGroup:
    local = os.environ.get("LOCAL_RANK")
    return init_distributed(
        int(os.environ["RANK"]),
        size,
        "env://",
        resolve_device(args.device),
        None if local is None else int(local),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
