"""The memory allocator a `pagedllm` command runs on: mimalloc, preloaded by re-executing once.

Under glibc's malloc a server's resident memory crept up under load: oneDNN's bfloat16
matmuls of the dequantized weight tiles ask for scratch of a different size with every
batch, and glibc keeps the heap they fragment (+8.2% after a 200-client load test on an
AMD EPYC; on mimalloc, which returns freed pages to the system, -6.1%, and 7% more
requests per second: BENCHMARKS.md, issue 17). An allocator must be in place before the
process's first malloc, so the command line re-executes itself once with ``LD_PRELOAD``
naming mimalloc, as PyTorch's CPU tuning guide does with jemalloc or tcmalloc.

``PAGEDLLM_ALLOCATOR=system`` keeps glibc's, a user's own ``LD_PRELOAD`` is left as it
is, and the command is re-executed unchanged otherwise (interpreter flags and arguments
as given, same pid). Where mimalloc is not installed (it comes
from the ``cmeel-mimalloc`` wheel on x86-64 Linux) nothing changes. The offline ``LLM``
runs in its caller's process: preload the library there (``python -m pagedllm.allocator``
prints its path).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from pathlib import Path

ENV = "PAGEDLLM_ALLOCATOR"  # "mimalloc" (the default) or "system"
_REEXECUTED = "PAGEDLLM_ALLOCATOR_REEXECUTED"  # set in the re-executed process
_LIBRARY = "libmimalloc.so"


def mimalloc_library() -> Path | None:
    """The installed mimalloc shared library, or None."""
    try:
        dist = importlib.metadata.distribution("cmeel-mimalloc")
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == _LIBRARY:
            path = Path(str(dist.locate_file(file)))
            return path if path.is_file() else None
    return None


def reexec_with_mimalloc() -> None:
    """Run this command again, exactly as it was started (same interpreter flags and
    arguments, same pid), with mimalloc preloaded; unless it was already re-executed, the
    user preloads something of their own (say jemalloc or tcmalloc, as PyTorch's guide
    suggests), chose the system allocator, or there is no mimalloc."""
    if (
        sys.platform != "linux"
        or os.environ.get(ENV, "mimalloc") == "system"
        or os.environ.get(_REEXECUTED)
        or os.environ.get("LD_PRELOAD")
    ):
        return
    library = mimalloc_library()
    if library is None:
        return
    # The marker, not LD_PRELOAD, ends the recursion: the loader drops LD_PRELOAD for a
    # privileged interpreter (setcap, setuid), which would otherwise re-execute forever.
    env = {**os.environ, "LD_PRELOAD": str(library), _REEXECUTED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the system. Loading a model frees much of
    what it touched (file reads, tokenizer parsing, repacking) and neither glibc nor
    mimalloc returns all of it unasked: for the default model 44 MB on glibc, 50 MB on
    mimalloc (BENCHMARKS.md, issue 12). An engine calls this once it is built."""
    process = ctypes.CDLL(None)
    collect = getattr(process, "mi_collect", None)  # mimalloc, when preloaded
    if collect is not None:
        collect.argtypes = [ctypes.c_bool]
        collect(True)
        return
    trim = getattr(process, "malloc_trim", None)  # glibc
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)


def cli() -> None:
    """The `pagedllm` console script: the allocator first, then the command line."""
    reexec_with_mimalloc()
    from pagedllm.entrypoints.cli import run

    run()


if __name__ == "__main__":
    library = mimalloc_library()
    print(library or "mimalloc is not installed")
    sys.exit(0 if library else 1)
