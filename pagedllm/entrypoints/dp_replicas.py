"""The replica processes of `pagedllm serve --data-parallel-size N`: started, awaited, stopped.

Each replica is `pagedllm serve` itself, in its own process, bound to 127.0.0.1 on a
free port, with the engine flags the front was given and its share of the CPU: unless
`--threads T` says how many threads each replica runs, the cores this process may use
are split into N equal sets and each replica is pinned to one (at least one thread
each), so replicas do not fight over cores. A replica dies with the front: it asks the
kernel for SIGTERM when its parent exits (PR_SET_PDEATHSIG), so even a front killed
with SIGKILL leaves no engine behind.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from pagedllm.config import EngineArgs

logger = logging.getLogger("pagedllm.data_parallel")

START_TIMEOUT_S = 900.0  # loading a large model, or compiling the kernels the first time
# server flags a replica shares with the front; the address, CORS and Host checks are
# the front's own, and the API key travels in the environment (not in `ps`'s view)
_SERVER_FLAGS = (
    "served_model_name",
    "tool_call_parser",
    "max_request_body_bytes",
    "drain_timeout",
    "log_stats_interval",
    "log_level",
)
_PR_SET_PDEATHSIG = 1


class ReplicaStartError(RuntimeError):
    """A replica exited, or did not answer, while starting."""


@dataclass
class Replica:
    """One replica server: its base URL, and its process when the front started it."""

    index: int
    url: str
    process: subprocess.Popen | None = None

    @property
    def exit_code(self) -> int | None:
        """The process's exit status once it has exited (a signal: minus its number)."""
        return None if self.process is None else self.process.poll()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def replica_argv(args: argparse.Namespace, port: int, threads: int) -> list[str]:
    """The `pagedllm serve` command line of one replica, rebuilt from the parsed flags
    (robust to abbreviations, `--x=y` and values from the environment)."""
    argv = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve"]
    if args.model:
        argv.append(args.model)
    argv += ["--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)]
    for name in _SERVER_FLAGS:
        value = getattr(args, name)
        if isinstance(value, list):
            argv += [_flag(name), *value]
        elif value is not None:
            argv.append(f"{_flag(name)}={value}")
    for field in dataclasses.fields(EngineArgs):
        value = getattr(args, field.name, None)
        if field.name in ("model", "threads") or value is None:
            continue
        if isinstance(value, bool):
            argv.append(_flag(field.name) if value else "--no-" + field.name.replace("_", "-"))
        else:
            argv.append(f"{_flag(field.name)}={value}")
    return argv


def cpu_shares(num_replicas: int, threads: int | None) -> list[tuple[int, set[int] | None]]:
    """(threads, cores to pin to or None) per replica: `threads` each when given, else an
    equal share of the usable cores, pinned when every replica gets at least one."""
    cores = sorted(os.sched_getaffinity(0))
    if threads is not None:
        return [(threads, None)] * num_replicas
    share = len(cores) // num_replicas
    if share < 1:
        return [(1, None)] * num_replicas
    return [(share, set(cores[i * share : (i + 1) * share])) for i in range(num_replicas)]


def _child_setup(cores: set[int] | None) -> Callable[[], None]:
    """What a replica runs between fork and exec: its cores, and death with its parent."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, never in the child

    def setup() -> None:
        if cores:
            os.sched_setaffinity(0, cores)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the front died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def start_replicas(args: argparse.Namespace, num_replicas: int) -> list[Replica]:
    """Start the replica processes (their output goes to this process's)."""
    env = dict(os.environ)
    env.pop("PAGEDLLM_API_KEY", None)
    if args.api_key is not None:
        env["PAGEDLLM_API_KEY"] = args.api_key
    replicas = []
    for index, (threads, cores) in enumerate(cpu_shares(num_replicas, args.threads)):
        port = _free_port()
        process = subprocess.Popen(
            replica_argv(args, port, threads),
            env=env,
            preexec_fn=_child_setup(cores) if sys.platform == "linux" else None,
        )
        replicas.append(Replica(index, f"http://127.0.0.1:{port}", process))
        logger.info(
            "replica %d: pid %d on port %d, %d thread(s)%s",
            index,
            process.pid,
            port,
            threads,
            f" on cores {sorted(cores)}" if cores else "",
        )
    return replicas


def wait_until_healthy(replicas: Sequence[Replica], timeout: float = START_TIMEOUT_S) -> None:
    """Return once every replica answers /health with 200; ReplicaStartError naming the
    replica if one exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    waiting = list(replicas)
    with httpx.Client(timeout=5.0) as client:
        while waiting:
            for replica in list(waiting):
                if replica.exit_code is not None:
                    raise ReplicaStartError(
                        f"replica {replica.index} exited with code {replica.exit_code} while "
                        "starting (its log is above)"
                    )
                try:
                    if client.get(replica.url + "/health").status_code == 200:
                        waiting.remove(replica)
                except httpx.HTTPError:
                    pass
            if waiting and time.monotonic() > deadline:
                names = ", ".join(str(r.index) for r in waiting)
                raise ReplicaStartError(f"replica(s) {names} did not start within {timeout:.0f} s")
            if waiting:
                time.sleep(0.25)


def stop_replicas(replicas: Sequence[Replica], timeout: float = 30.0) -> None:
    """SIGTERM every replica still running (each drains), SIGKILL those left at the timeout."""
    running = [r.process for r in replicas if r.process is not None and r.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
