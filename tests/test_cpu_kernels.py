"""Building and caching the C kernels: levels chosen from the CPU's flags, a cache key that
tells CPUs and compilers apart, a private cache folder, and the torch fallback."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
import torch

from pagedllm import cpu_kernels
from pagedllm.model.layers import quantized
from pagedllm.worker.kv_cache import allocate_kv_cache

SOURCE = quantized.SOURCE


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache and no memoised libraries, restored afterwards."""
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path / "cache"))
    for fn in (cpu_kernels.compiled, cpu_kernels.kernel, quantized.kernels):
        fn.cache_clear()
    yield tmp_path / "cache" / "pagedllm" / "kernels"
    for fn in (cpu_kernels.compiled, cpu_kernels.kernel, quantized.kernels):
        fn.cache_clear()


def test_levels_follow_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    assert cpu_kernels.supported_levels() == ["portable", "avx2"]
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset())
    assert cpu_kernels.supported_levels() == ["portable"]
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert cpu_kernels.supported_levels() == ["portable"]


def test_level_override_must_be_one_the_cpu_runs(monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CPU_LEVEL", "portable")
    assert cpu_kernels.best_level() == "portable"
    monkeypatch.setenv("PAGEDLLM_CPU_LEVEL", "avx9000")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_LEVEL"):
        cpu_kernels.best_level()


def test_cache_key_changes_with_the_cpu_and_the_compiler(monkeypatch):
    compiler = cpu_kernels.c_compiler() or "cc"
    base = cpu_kernels.library_path(SOURCE, "portable", compiler)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: frozenset({"sse2"}))
    other_cpu = cpu_kernels.library_path(SOURCE, "portable", compiler)
    monkeypatch.setattr(cpu_kernels, "compiler_version", lambda c: "gcc 99")
    other_compiler = cpu_kernels.library_path(SOURCE, "portable", compiler)
    assert len({base, other_cpu, other_compiler}) == 3
    assert "portable" in base.name and base.suffix == ".so"


@pytest.mark.skipif(cpu_kernels.c_compiler() is None, reason="no C compiler")
def test_cache_folder_is_created_private(fresh_cache):
    assert quantized.kernels("portable") is not None
    assert stat.S_IMODE(fresh_cache.stat().st_mode) == 0o700
    assert any(p.name.startswith("quant_matmul-portable-") for p in fresh_cache.iterdir())


@pytest.mark.skipif(cpu_kernels.c_compiler() is None, reason="no C compiler")
def test_cache_others_can_write_is_refused(fresh_cache, caplog):
    fresh_cache.mkdir(parents=True)
    fresh_cache.chmod(0o777)
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.compiled(SOURCE, "portable") is None
    assert "writable by other users" in caplog.text


@pytest.mark.skipif(
    cpu_kernels.c_compiler() is None or os.getuid() != 0, reason="needs a compiler and root"
)
def test_cached_library_of_another_user_is_refused(fresh_cache, caplog):
    compiler = cpu_kernels.c_compiler()
    target = cpu_kernels.library_path(SOURCE, "portable", compiler)
    cpu_kernels.private_dir(target.parent)
    target.write_bytes(b"not a library")
    os.chown(target, 65534, 65534)  # nobody
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.compiled(SOURCE, "portable") is None
    assert "owned by another user" in caplog.text


def test_no_compiler_falls_back_to_dense_weights(fresh_cache, monkeypatch, tmp_path, caplog):
    """Without a compiler a quantized file loads dequantized (the torch path) and computes
    what the block kernels compute."""
    from gguf import GGMLQuantizationType

    from pagedllm.attention import AttentionMetadata
    from pagedllm.model.layers.linear import Linear
    from pagedllm.model.loader import load_model
    from tests.model.tiny_gguf import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", quantize=GGMLQuantizationType.Q8_0)

    def logits(model):
        c = model.config
        kv = allocate_kv_cache(c, 4, 16, torch.float32, torch.device("cpu"))
        meta = AttentionMetadata.build([5], [5], [[0]], 16)
        with torch.no_grad():
            return model.compute_logits(model(torch.arange(5), meta.positions, kv, meta))

    blocks = load_model(path, torch.float32, exact_matmul=True)
    assert all(m.weight is None for m in blocks.modules() if isinstance(m, Linear))
    expected = logits(blocks)
    for fn in (cpu_kernels.compiled, cpu_kernels.kernel, quantized.kernels):
        fn.cache_clear()
    monkeypatch.setattr(cpu_kernels, "c_compiler", lambda: None)
    with caplog.at_level(logging.WARNING):
        dense = load_model(path, torch.float32)
    assert "no C compiler" in caplog.text
    assert all(m.weight is not None for m in dense.modules() if isinstance(m, Linear))
    torch.testing.assert_close(logits(dense), expected, rtol=1e-4, atol=1e-4)


def test_disabled_kernels_build_nothing(fresh_cache, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_DISABLE_KERNELS", "1")
    assert cpu_kernels.compiled(SOURCE) is None
    assert not Path(fresh_cache).exists()
