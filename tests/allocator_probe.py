"""Run by tests/test_allocator.py as `python -m tests.allocator_probe`: which allocator
this process has mapped."""

from pathlib import Path

maps = Path("/proc/self/maps").read_text()
print("probe", "mimalloc" if "libmimalloc.so" in maps else "glibc")
