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
