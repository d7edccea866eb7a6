"""C kernels for the CPU, compiled on first use with the machine's C compiler.

Each source is built for the CPU it runs on (`-march=native`) into a per-user cache keyed
by the source and the flags, and loaded with ctypes: no build step at install time, and a
machine without a compiler (or a kernel that fails to build) falls back to torch, with
one warning. ctypes releases the GIL for the call; the kernels parallelise with OpenMP,
whose runtime is the one torch already loaded (same soname), so they share its threads.
`PAGEDLLM_DISABLE_KERNELS=1` turns them all off (to compare, or to rule them out).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def cache_dir() -> Path:
    root = os.environ.get("PAGEDLLM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "pagedllm" / "kernels"


def c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(compiler: str, source: Path, target: Path, flags: tuple[str, ...] = FLAGS) -> None:
    """Compile `source` into the shared library `target` (atomically replaced)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(source), "-o", str(out), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(out, target)  # concurrent builders each install a whole file


@functools.cache
def compiled(source: Path) -> ctypes.CDLL | None:
    """The library built from `source`, or None where it cannot be built."""
    if os.environ.get("PAGEDLLM_DISABLE_KERNELS"):
        return None
    compiler = c_compiler()
    if compiler is None:
        logger.warning("no C compiler found: %s falls back to torch", source.name)
        return None
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *FLAGS]).encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            build(compiler, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-500:]
        logger.warning("could not build %s (%s %s): falling back to torch", source.name, e, detail)
        return None


def declare(lib: ctypes.CDLL, name: str, *argtypes: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    """`lib.name` with its argument types set and an int result (kernels return a status)."""
    fn = getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def kernel(source: Path, name: str, argtypes: tuple[type, ...]) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """Function `name` of the library built from `source`, or None where it cannot be built."""
    lib = compiled(source)
    return None if lib is None else declare(lib, name, *argtypes)
