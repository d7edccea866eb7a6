"""The CLI's allocator: mimalloc preloaded by re-executing once, or glibc's when asked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedllm.allocator import ENV, mimalloc_library

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.uname().machine != "x86_64", reason="mimalloc wheel: x86-64"
)

# The child's allocator, read from its own memory map after the command line started it.
PROBE = (
    "import sys; from pagedllm.allocator import reexec_with_mimalloc; "
    "reexec_with_mimalloc('tests.allocator_probe')"
)


def run_probe(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ENV)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**environ, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_library_is_installed_with_pagedllm():
    library = mimalloc_library()
    assert library is not None and library.is_file()


def test_a_command_reexecutes_once_on_mimalloc():
    assert run_probe().split() == ["probe", "mimalloc"]


def test_the_system_allocator_on_request():
    # no re-execution: the -c program itself ends without running the probe
    assert run_probe(**{ENV: "system"}) == ""
