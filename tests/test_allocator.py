"""The CLI's allocator: mimalloc preloaded by re-executing once, or left alone when the
user chose the system's, preloads their own, or the process was re-executed already."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedllm.allocator import ENV, mimalloc_library

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine != "x86_64", reason="mimalloc wheel: x86-64"
)

# What a command does first, then which allocator the process ended up with (its own
# memory map) and with how many re-executions.
PROBE = """
import os, sys
from pathlib import Path
from pagedllm.allocator import reexec_with_mimalloc
reexec_with_mimalloc()
maps = Path("/proc/self/maps").read_text()
print("mimalloc" if "libmimalloc.so" in maps else "glibc", sys.orig_argv[1:3] == ["-X", "utf8"])
"""


def run_probe(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("LD_", ENV))}
    out = subprocess.run(
        [sys.executable, "-X", "utf8", "-c", PROBE],
        env={**environ, **env},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_library_is_installed_with_pagedllm():
    library = mimalloc_library()
    assert library is not None and library.is_file()


def test_a_command_reexecutes_once_on_mimalloc_with_its_own_flags():
    assert run_probe() == "mimalloc True"


@pytest.mark.parametrize(
    "env",
    [
        {ENV: "system"},
        {"LD_PRELOAD": "libm.so.6"},  # the user's own preload stays the only one
        {f"{ENV}_REEXECUTED": "1"},  # never a second time, even if LD_PRELOAD was dropped
    ],
    ids=["system", "user-preload", "already-reexecuted"],
)
def test_no_reexecution(env):
    assert run_probe(**env) == "glibc True"


# 96 MiB malloc'd in 64 KiB blocks (on the heap, below mmap's threshold), written, freed
# but for a last block that keeps the heap from shrinking by itself; then the release.
RELEASE_PROBE = """
import ctypes
from pathlib import Path
from pagedllm.allocator import release_free_memory

def anon_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 << 10) for _ in range(1536)]
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
keep = libc.malloc(64 << 10)
for block in blocks:
    libc.free(block)
before = anon_kib()
release_free_memory()
print(before - anon_kib())
"""


@pytest.mark.parametrize("allocator", ["system", "mimalloc"])
def test_releasing_free_memory_returns_freed_pages_to_the_system(allocator):
    """What an engine frees while it loads leaves the process (RssAnon falls) on either
    allocator: glibc keeps freed heap pages until malloc_trim, mimalloc until a purge."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LD_", ENV))}
    if allocator == "mimalloc":
        library = mimalloc_library()
        if library is None:
            pytest.skip("mimalloc is not installed")
        env["LD_PRELOAD"] = str(library)
    out = subprocess.run(
        [sys.executable, "-c", RELEASE_PROBE], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 48 << 10  # KiB: at least half of the 96 MiB freed
