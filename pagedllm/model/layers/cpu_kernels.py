"""The C kernels in `csrc/`, compiled on first use with the machine's C compiler.

They are built for the CPU they run on (`-march=native`) into a per-user cache keyed by
the source and the flags, and loaded with ctypes: no build step at install time, and a
machine without a compiler (or a kernel that fails to build) falls back to torch.
ctypes releases the GIL for the call; the kernels parallelise with OpenMP, whose runtime
is the one torch already loaded (same soname), so they share its threads.
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

SOURCE = Path(__file__).resolve().parent / "csrc" / "block_quant_matmul.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    root = os.environ.get("PAGEDLLM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "pagedllm" / "kernels"


def build(compiler: str, target: Path, flags: list[str] = FLAGS) -> None:
    """Compile SOURCE into the shared library `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(out)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(out, target)  # atomic: concurrent builders each install a whole file


@functools.cache
def block_quant_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be built."""
    if os.environ.get("PAGEDLLM_DISABLE_KERNELS"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: quantized matmuls fall back to float32 weights")
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode())
    target = cache_dir() / f"block_quant_matmul-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            build(compiler, target)
        lib = load(target)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        logger.warning(
            "could not build %s (%s %s): quantized matmuls fall back to float32 weights",
            SOURCE.name,
            e,
            detail.decode(errors="replace")[-500:],
        )
        return None
    return lib


def load(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its functions' signatures."""
    lib = ctypes.CDLL(str(path))
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    fn = lib.block_quant_matmul
    fn.argtypes = [integer, pointer, integer, integer, pointer, pointer, pointer]
    fn.argtypes += [integer, pointer, integer]
    fn.restype = integer
    return lib
