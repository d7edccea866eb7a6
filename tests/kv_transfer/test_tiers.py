"""The offload tiers: LRU bounds, files that survive a restart, and every way a disk
block can be wrong (another model's, truncated, flipped bits) detected on read."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

from pagedllm.kv_transfer.tiers import DiskTier, HostTier

FP_A, FP_B = bytes(range(32)), bytes(range(1, 33))


def key(i: int) -> bytes:
    return i.to_bytes(32, "little")


def test_host_tier_drops_the_least_recently_used_past_its_capacity():
    host = HostTier(capacity_bytes=25)
    for i in range(2):
        host.put(key(i), torch.full((10,), i, dtype=torch.uint8))
    assert host.get(key(0)) is not None  # 0 is now the most recently used
    host.put(key(2), torch.full((10,), 2, dtype=torch.uint8))
    assert key(1) not in host and key(0) in host and key(2) in host
    assert host.num_bytes == 20 and len(host) == 2
    host.put(key(3), torch.zeros(30, dtype=torch.uint8))  # larger than the tier: not kept
    assert key(3) not in host
    host.put(key(2), torch.zeros(5, dtype=torch.uint8))  # replacing counts the new size
    assert host.num_bytes == 15


def test_disk_tier_round_trip_survives_a_restart_in_a_private_directory(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20, FP_A)
    assert stat.S_IMODE(disk.dir.stat().st_mode) == 0o700
    disk.put(key(1), b"abc" * 100)
    disk.put(key(1), b"ignored: already there")
    assert disk.get(key(1)) == b"abc" * 100 and disk.get(key(2)) is None
    again = DiskTier(tmp_path, 1 << 20, FP_A)
    assert key(1) in again and again.get(key(1)) == b"abc" * 100
    assert key(1) not in DiskTier(tmp_path, 1 << 20, FP_B)  # another model's directory


def test_disk_tier_deletes_the_oldest_files_past_its_capacity(tmp_path):
    disk = DiskTier(tmp_path, 3100, FP_A)  # three files of 900 bytes and a header
    for i in range(5):
        disk.put(key(i), bytes(900))
    assert [key(i) in disk for i in range(5)] == [False, False, True, True, True]
    assert len(list(disk.dir.iterdir())) == 3 and disk.num_bytes <= 3100


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
        (lambda b: b"garbage!" + b[8:], "not a pagedllm KV block"),
        (lambda b: b"", "not a pagedllm KV block"),
    ],
)
def test_a_damaged_block_file_is_a_miss_and_is_deleted(tmp_path, caplog, damage, problem):
    disk = DiskTier(tmp_path, 1 << 20, FP_A)
    disk.put(key(7), bytes(range(256)))
    path = disk.path(key(7))
    path.write_bytes(damage(path.read_bytes()))
    assert disk.get(key(7)) is None
    assert problem in caplog.text and str(path) in caplog.text
    assert not path.exists() and key(7) not in disk and disk.num_bytes == 0


def test_a_file_from_another_model_or_block_is_never_used(tmp_path, caplog):
    theirs = DiskTier(tmp_path / "b", 1 << 20, FP_B)
    theirs.put(key(1), b"their kv")
    ours = DiskTier(tmp_path / "a", 1 << 20, FP_A)
    shutil.copy(theirs.path(key(1)), ours.path(key(1)))  # copied in by hand
    ours.put(key(2), b"our kv")
    shutil.copy(ours.path(key(2)), ours.path(key(3)))  # a block renamed
    ours = DiskTier(tmp_path / "a", 1 << 20, FP_A)
    assert key(1) in ours and ours.get(key(1)) is None and "another model" in caplog.text
    assert ours.get(key(3)) is None and "another block" in caplog.text
    assert ours.get(key(2)) == b"our kv"


def test_an_unusable_disk_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"disk_path .* is not usable"):
        DiskTier(blocker, 1 << 20, FP_A)


def test_a_failed_write_loses_only_that_copy(tmp_path, caplog, monkeypatch):
    disk = DiskTier(tmp_path, 1 << 20, FP_A)

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    disk.put(key(1), b"kv")
    assert key(1) not in disk and "No space left" in caplog.text
    assert list(disk.dir.iterdir()) == []  # the temporary file is gone too
