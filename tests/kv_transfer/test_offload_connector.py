"""The offload connector over real KV caches: every storage format's blocks (values
and scales) come back bit for bit, from host memory and from disk, and a lookup
counts consecutive blocks only."""

from __future__ import annotations

import pytest
import torch

from pagedllm.attention.kv_cache import make_kv_cache
from pagedllm.config import KVOffloadConfig
from pagedllm.core.kv_connector import KVLoad
from pagedllm.kv_transfer.blocks import fingerprint
from pagedllm.kv_transfer.offload import OffloadConnector

FORMATS = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn]


def caches(dtype: torch.dtype, num_layers: int = 3):
    out = []
    for layer in range(num_layers):
        cache = make_kv_cache(8, 4, 2, 16, dtype=dtype)
        generator = torch.Generator().manual_seed(layer)
        key = torch.randn(32, 2, 16, generator=generator)
        cache.write(key, -key, torch.arange(32))
        out.append(cache)
    return out


def snapshot(kv) -> list[torch.Tensor]:
    parts = []
    for cache in kv:
        parts.append(cache.data.view(torch.uint8).clone())
        if hasattr(cache, "scales"):
            parts.append(cache.scales.clone())
    return parts


def wipe(kv, block_ids: list[int]) -> None:
    for cache in kv:
        cache.data.view(torch.uint8)[:, block_ids] = 0
        if hasattr(cache, "scales"):
            cache.scales[:, block_ids] = 0


def key(i: int) -> bytes:
    return bytes([i]) * 32


def reported(connector) -> dict[str, int]:
    """Poll until a load is reported (an idle poll waits only a moment)."""
    for _ in range(400):
        done = connector.poll(wait_for_one=True)
        if done:
            return done
    raise AssertionError("the load never ended")


@pytest.mark.parametrize("dtype", FORMATS, ids=str)
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_saved_blocks_load_back_bit_for_bit(tmp_path, dtype, tier):
    kv = caches(dtype)
    config = (
        KVOffloadConfig(host_gib=1)
        if tier == "host"
        else KVOffloadConfig(host_gib=0, disk_path=str(tmp_path))
    )
    connector = OffloadConnector(config, kv, fingerprint(tmp_path, kv))
    before = snapshot(kv)
    # the host tier takes evicted blocks, the disk computed ones
    connector.start([(key(i), i, tier == "host") for i in (1, 2, 5)], [])
    if tier == "disk":  # a restart: the writes finish, a new connector finds the files
        connector.close()
        connector = OffloadConnector(config, kv, fingerprint(tmp_path, kv))
    assert connector.num_loadable_blocks([key(1), key(2), key(3), key(5)], None) == 2
    wipe(kv, [1, 2, 5, 6])
    # load 1 and 2 into blocks 6 and 5 (anywhere in the pool)
    connector.start([], [KVLoad("r", [key(1), key(2)], [6, 5])])
    assert reported(connector) == {"r": 2}
    after = snapshot(kv)
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a[:, 6], b[:, 1]) and torch.equal(a[:, 5], b[:, 2])
        assert torch.equal(
            a[:, :5], torch.cat([b[:, :1], torch.zeros_like(b[:, 1:3]), b[:, 3:5]], 1)
        )
    stats = connector.stats
    assert stats.loads == 1 and stats.bytes_loaded == 2 * connector.block_bytes
    assert stats.blocks_loaded == {tier: 2}


def test_block_bytes_are_every_layers_keys_values_and_scales():
    kv = caches(torch.int8)
    connector = OffloadConnector(KVOffloadConfig(), kv, b"f" * 32)
    # per layer: K and V, 4 slots x 2 heads x (16 int8 values + one float16 scale)
    assert connector.block_bytes == 3 * 2 * 4 * 2 * (16 + 2)


def test_a_load_stops_at_the_first_missing_block(tmp_path):
    kv = caches(torch.float32)
    connector = OffloadConnector(KVOffloadConfig(), kv, b"f" * 32)
    connector.start([(key(1), 1, True), (key(3), 3, True)], [])
    connector.start([], [KVLoad("r", [key(1), key(2), key(3)], [4, 5, 6])])
    assert reported(connector) == {"r": 1}
    assert connector.stats.load_failures == 1
    assert connector.poll() == {}


def test_computed_blocks_go_to_disk_and_evicted_ones_to_host(tmp_path):
    kv = caches(torch.float32)
    both = OffloadConnector(KVOffloadConfig(disk_path=str(tmp_path)), kv, b"f" * 32)
    assert both.wants_block(key(1), evicted=False) and both.wants_block(key(1), evicted=True)
    host_only = OffloadConnector(KVOffloadConfig(), kv, b"f" * 32)
    assert not host_only.wants_block(key(1), evicted=False)
    host_only.start([(key(1), 1, True)], [])
    assert not host_only.wants_block(key(1), evicted=True)


def test_the_fingerprint_tells_models_and_formats_apart(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"x" * 10)
    f32, bf16 = caches(torch.float32, 1), caches(torch.bfloat16, 1)
    assert fingerprint(model, f32) == fingerprint(model, f32)
    assert fingerprint(model, f32) != fingerprint(model, bf16)
    assert fingerprint(model, f32) != fingerprint(model, f32, "exact")
    before = fingerprint(model, f32)
    model.write_bytes(b"x" * 11)  # another file at the same path
    assert fingerprint(model, f32) != before
