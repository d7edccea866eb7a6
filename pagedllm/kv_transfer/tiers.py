"""The offload tiers: KV blocks by prefix-cache hash in host memory and on disk.

Both are LRU caches bounded in bytes and safe to use from several threads (the engine
thread asks what they hold; a loader and a writer thread move the bytes). A disk block
is one file named by its hash, written atomically (a temporary file, then a rename)
with a header that names the format, the model-and-format fingerprint, the hash, the
payload's length and its BLAKE2b digest: a file from another model, a truncated write
or a flipped bit is detected on read, deleted and reported as a miss, so the engine
recomputes those tokens instead of attending to wrong KV.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAGIC = b"PGLLMKV1"
_HEADER = struct.Struct("<8s32sH")  # magic, fingerprint, key length; then the key
_TRAILER = struct.Struct("<Q32s")  # payload length, BLAKE2b-256 of the payload
SUFFIX = ".kv"


def _digest(payload: bytes | memoryview) -> bytes:
    return hashlib.blake2b(payload, digest_size=32).digest()


class HostTier:
    """Blocks as uint8 tensors in process memory, least recently used dropped first."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.num_bytes = 0
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            payload = self._blocks.get(key)
            if payload is not None:
                self._blocks.move_to_end(key)
            return payload

    def put(self, key: bytes, payload: torch.Tensor) -> None:
        size = payload.numel()
        if size > self.capacity_bytes:
            return
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None:
                self.num_bytes -= old.numel()
            self._blocks[key] = payload
            self.num_bytes += size
            while self.num_bytes > self.capacity_bytes:
                _, dropped = self._blocks.popitem(last=False)
                self.num_bytes -= dropped.numel()


class DiskTier:
    """Blocks as files under ``root/<fingerprint>/``, least recently used deleted first.

    The directory is private to the user (0700); files already there from an earlier
    run with the same fingerprint are indexed at start, oldest first, so the tier
    outlives the server.
    """

    def __init__(self, root: str | Path, capacity_bytes: int, fingerprint: bytes) -> None:
        if len(fingerprint) != 32:
            raise ValueError("a disk tier's fingerprint is 32 bytes")
        self.fingerprint = fingerprint
        self.capacity_bytes = capacity_bytes
        self.dir = Path(root).expanduser() / fingerprint.hex()[:16]
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"kv_offload disk_path {str(root)!r} is not usable: {e}") from e
        self._lock = threading.Lock()
        self._files: OrderedDict[bytes, int] = OrderedDict()  # key -> file size
        self.num_bytes = 0
        found = []
        for path in self.dir.glob("*" + SUFFIX):
            try:
                key = bytes.fromhex(path.name.removesuffix(SUFFIX))
                stat = path.stat()
            except (ValueError, OSError):
                continue
            found.append((stat.st_mtime, key, stat.st_size))
        for _, key, size in sorted(found):
            self._files[key] = size
            self.num_bytes += size
        self._trim()

    def __contains__(self, key: bytes) -> bool:
        return key in self._files

    def __len__(self) -> int:
        return len(self._files)

    def path(self, key: bytes) -> Path:
        return self.dir / (key.hex() + SUFFIX)

    def put(self, key: bytes, payload: bytes) -> None:
        """Write one block (from the writer thread); a failed write only loses the copy."""
        if key in self._files:
            return
        header = _HEADER.pack(MAGIC, self.fingerprint, len(key)) + key
        trailer = _TRAILER.pack(len(payload), _digest(payload))
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(trailer)
                f.write(payload)
            os.replace(tmp, self.path(key))
        except OSError as e:
            logger.warning("kv_offload: could not write a block to %s: %s", self.dir, e)
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)
            return
        size = len(header) + _TRAILER.size + len(payload)
        with self._lock:
            self._files[key] = size
            self.num_bytes += size
        self._trim()

    def get(self, key: bytes) -> memoryview | None:
        """The block's payload (a writable view, no copy), or None if missing or not this
        model's intact block (the file is then deleted)."""
        if key not in self._files:
            return None
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                data = memoryview(bytearray(os.fstat(f.fileno()).st_size))
                f.readinto(data)
        except OSError:
            self._forget(key, delete=False)
            return None
        problem = self._check(data, key)
        if problem is not None:
            logger.warning("kv_offload: %s %s; recomputing its tokens", path, problem)
            self._forget(key, delete=True)
            return None
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
        return data[_HEADER.size + len(key) + _TRAILER.size :]

    def _check(self, data: memoryview, key: bytes) -> str | None:
        """Why `data` is not this model's intact block for `key`, or None."""
        if len(data) < _HEADER.size or bytes(data[:8]) != MAGIC:
            return "is not a pagedllm KV block"
        _, fingerprint, key_length = _HEADER.unpack_from(data)
        if fingerprint != self.fingerprint:
            return "holds another model's (or KV format's) block"
        start = _HEADER.size + key_length
        if data[_HEADER.size : start] != key or len(data) < start + _TRAILER.size:
            return "holds another block"
        length, digest = _TRAILER.unpack_from(data, start)
        payload = data[start + _TRAILER.size :]
        if len(payload) != length:
            return f"is truncated ({len(payload)} of {length} payload bytes)"
        if _digest(payload) != digest:
            return "is corrupt (checksum mismatch)"
        return None

    def _forget(self, key: bytes, delete: bool) -> None:
        with self._lock:
            size = self._files.pop(key, None)
            if size is not None:
                self.num_bytes -= size
        if delete:
            with contextlib.suppress(OSError):
                self.path(key).unlink()

    def _trim(self) -> None:
        while True:
            with self._lock:
                if self.num_bytes <= self.capacity_bytes or not self._files:
                    return
                key, size = self._files.popitem(last=False)
                self.num_bytes -= size
            with contextlib.suppress(OSError):
                self.path(key).unlink()
