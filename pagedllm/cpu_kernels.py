"""C kernels for the CPU, compiled on first use with the machine's C compiler.

Each source is built once per instruction-set level into a per-user cache and loaded with
ctypes: no build step at install time, and a machine without a compiler (or a kernel that
fails to build) falls back to torch, with one warning. The level is chosen at run time
from the CPU's flags (`best_level`), so one cache can serve different machines: its key
holds the source, the compiler and its version, the flags and the CPU's feature set, and
a library built for another CPU is never loaded (an illegal instruction would be a crash).
The cache folder is created private (0700); a folder or library owned by someone else is
refused, since loading a library runs its code.

ctypes releases the GIL for the call; the kernels parallelise with OpenMP, whose runtime
is the one torch already loaded (same soname), so they share its threads.
`PAGEDLLM_DISABLE_KERNELS=1` turns them all off; `PAGEDLLM_CPU_LEVEL=portable|avx2|avx512vnni`
picks a lower level than the CPU allows (to compare, or to rule a path out).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

BASE_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")
AVX512_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
# Levels from least to most capable: compiler flags and the /proc/cpuinfo flags they need.
LEVELS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "portable": ((), frozenset()),
    "avx2": (("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"})),
    "avx512vnni": (
        (*AVX512_FLAGS, "-mavx512vnni"),
        frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"})
        | {"avx512_vnni"},
    ),
}


class KernelCacheError(OSError):
    """The kernel cache is not ours alone (another user owns it, or anyone may write it)."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: portable kernels)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_levels() -> list[str]:
    """Every level this CPU can run, least capable first (x86-64 only beyond portable)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["portable"]
    return [name for name, (_, needs) in LEVELS.items() if needs <= cpu_flags()]


def best_level() -> str:
    """The most capable level the CPU runs, or the lower one PAGEDLLM_CPU_LEVEL asks for."""
    levels = supported_levels()
    wanted = os.environ.get("PAGEDLLM_CPU_LEVEL")
    if wanted:
        if wanted not in levels:
            raise ValueError(f"PAGEDLLM_CPU_LEVEL={wanted!r}: this CPU runs {levels}")
        return wanted
    return levels[-1]


def cache_dir() -> Path:
    root = os.environ.get("PAGEDLLM_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root or Path.home() / ".cache") / "pagedllm" / "kernels"


def c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def compiler_version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.decode(errors="replace").splitlines()[0] if out.stdout else "unknown"


def level_flags(level: str) -> tuple[str, ...]:
    return BASE_FLAGS + LEVELS[level][0]


def private_dir(path: Path) -> Path:
    """`path`, created 0700 if missing; KernelCacheError if another user owns it or others
    may write to it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_owned(path)
    if path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelCacheError(f"{path} is writable by other users")
    return path


def check_owned(path: Path) -> None:
    if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
        raise KernelCacheError(f"{path} is owned by another user")


def build(compiler: str, source: Path, target: Path, flags: tuple[str, ...]) -> None:
    """Compile `source` into the shared library `target` (atomically replaced)."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run(
            [compiler, *flags, str(source), "-o", str(out), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(out, target)  # concurrent builders each install a whole file


def library_path(source: Path, level: str, compiler: str) -> Path:
    """Where the build of `source` at `level` lives in the cache, keyed by all it depends on."""
    key = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # what the source may include
        key.update(header.read_bytes())
    for part in (compiler, compiler_version(compiler), *level_flags(level), *sorted(cpu_flags())):
        key.update(b"\0" + part.encode())
    return cache_dir() / f"{source.stem}-{level}-{key.hexdigest()[:16]}.so"


@functools.cache
def compiled(source: Path, level: str | None = None) -> ctypes.CDLL | None:
    """The library built from `source` for `level` (default: `best_level()`), or None where
    it cannot be built."""
    if os.environ.get("PAGEDLLM_DISABLE_KERNELS"):
        return None
    compiler = c_compiler()
    if compiler is None:
        logger.warning("no C compiler (cc, gcc or $CC) found: %s falls back to torch", source.name)
        return None
    level = level or best_level()
    try:
        target = library_path(source, level, compiler)
        private_dir(target.parent)
        if not target.exists():
            build(compiler, source, target, level_flags(level))
        check_owned(target)
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
def kernel(
    source: Path, name: str, argtypes: tuple[type, ...], level: str | None = None
) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """Function `name` of the library built from `source` (at `level`), or None where it
    cannot be built."""
    lib = compiled(source, level)
    return None if lib is None else declare(lib, name, *argtypes)
