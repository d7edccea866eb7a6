"""Prefill/decode disaggregation: a producer engine serves the KV blocks it computed, a
consumer engine pulls a request's prompt blocks from it over TCP.

The producer (``--kv-transfer-config '{"kv_role": "kv_producer", ...}'``) copies every
block it computes into a host buffer (an LRU of ``kv_buffer_gib``) and answers, on
``kv_ip:kv_port``, requests for blocks by their prefix-cache hash: hashes are SHA-256
chains of token ids, equal in every engine that tokenizes the prompt the same way. Its
HTTP responses carry ``kv_transfer_params`` (its address) for the router to pass on.
The consumer (``kv_consumer``) admits a request whose ``kv_transfer_params`` name a
producer as if those blocks were there, and fetches them on its loader thread; whatever
does not arrive (the producer evicted it, died, or runs another model) is recomputed.

A consumer connects only to the producers its own config lists (``kv_producers``),
whatever a request's params say, and only takes blocks from one that answers with its
own fingerprint: a client cannot point it at a server that would fill its prefix cache
with made-up KV. Every transfer has an overall deadline, so a slow or hung peer costs a
recomputation, never a stuck engine.

Wire format, little-endian. Request: ``MAGIC, fingerprint[32], n: u32, n hashes[32]``.
Reply: ``MAGIC, fingerprint[32], status: u8 (0 ok, 1 another model), count: u32,
block_bytes: u64`` and ``count`` payloads of ``block_bytes`` (the leading blocks it
holds, in order).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pagedllm.attention.kv_cache import KVCache
from pagedllm.config import KVTransferConfig
from pagedllm.core.kv_connector import KVLoad
from pagedllm.kv_transfer.connector import ThreadedConnector
from pagedllm.kv_transfer.tiers import HostTier

logger = logging.getLogger(__name__)

MAGIC = b"PGLLMKVT"
HASH_BYTES = 32
MAX_BLOCKS_PER_REQUEST = 1 << 16
_REQUEST = struct.Struct("<8s32sI")
_REPLY = struct.Struct("<8s32sBIQ")
OK, WRONG_MODEL = 0, 1
GIB = 1 << 30
TRANSFER_DEADLINE_S = 30.0  # a whole transfer, from connecting to the last byte
CONNECT_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 16  # served at once by a producer; more are turned away


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytearray:
    """`size` bytes, read in place, or TimeoutError once `deadline` (time.monotonic)
    passes."""
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"transfer deadline passed after {got} of {size} bytes")
        sock.settimeout(remaining)
        n = sock.recv_into(view[got:], min(size - got, 1 << 22))
        if not n:
            raise ConnectionError(f"connection closed after {got} of {size} bytes")
        got += n
    return data


def _send_all(sock: socket.socket, data: bytes | memoryview, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("transfer deadline passed")
    sock.settimeout(remaining)
    sock.sendall(data)


class KVProducer(ThreadedConnector):
    """Keeps each computed block in a host buffer and serves it to consumers."""

    metrics_prefix = "kv_transfer"  # its loads are the consumer's: no tiers

    def __init__(
        self, config: KVTransferConfig, caches: Sequence[KVCache], fingerprint: bytes
    ) -> None:
        super().__init__(caches, fingerprint)
        self.buffer = HostTier(int(config.kv_buffer_gib * GIB))
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        producer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                producer._serve(self.request)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        try:
            self.server = socketserver.ThreadingTCPServer((config.kv_ip, config.kv_port), Handler)
        except OSError as e:
            raise ValueError(
                f"kv_transfer_config: cannot listen on {config.kv_ip}:{config.kv_port}: {e}"
            ) from e
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="pagedllm-kv-server", daemon=True
        )
        self._thread.start()
        logger.info("KV producer: serving computed blocks on %s:%d", self.host, self.port)
        try:
            local = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            local = self.host == "localhost"
        if not local:
            logger.warning(
                "KV producer: %s is reachable from other machines; whoever reaches it can "
                "read the KV of the prompts it computed (keep it on a private network)",
                self.host,
            )

    def transfer_params(self) -> dict[str, Any]:
        """What a consumer needs to pull this engine's blocks (sent with each response)."""
        return {"remote_host": self.host, "remote_port": self.port}

    def num_loadable_blocks(self, block_hashes: Sequence[bytes], transfer_params: object) -> int:
        return 0

    def wants_block(self, block_hash: bytes, evicted: bool) -> bool:
        return not evicted and block_hash not in self.buffer

    def keep(self, block_hash: bytes, row: torch.Tensor, evicted: bool) -> None:
        self.buffer.put(block_hash, row.clone())  # alone: a view would keep the batch

    def _serve(self, sock: socket.socket) -> None:
        """Answer one consumer's request (on a server thread), within the deadline."""
        if not self._slots.acquire(blocking=False):
            return  # too many at once: the consumer recomputes
        deadline = time.monotonic() + TRANSFER_DEADLINE_S
        try:
            header = _read_exactly(sock, _REQUEST.size, deadline)
            magic, fingerprint, n = _REQUEST.unpack(header)
            if magic != MAGIC or n > MAX_BLOCKS_PER_REQUEST:
                return
            data = _read_exactly(sock, n * HASH_BYTES, deadline)
            if fingerprint != self.fingerprint:
                reply = _REPLY.pack(MAGIC, self.fingerprint, WRONG_MODEL, 0, self.block_bytes)
                _send_all(sock, reply, deadline)
                return
            rows = []
            for i in range(n):
                row = self.buffer.get(bytes(data[i * HASH_BYTES : (i + 1) * HASH_BYTES]))
                if row is None:
                    break
                rows.append(row)
            reply = _REPLY.pack(MAGIC, self.fingerprint, OK, len(rows), self.block_bytes)
            _send_all(sock, reply, deadline)
            for row in rows:
                _send_all(sock, memoryview(row.numpy()), deadline)
        except (OSError, ConnectionError, struct.error) as e:
            logger.warning("KV producer: a transfer failed: %s", e)
        finally:
            self._slots.release()

    def close(self) -> None:
        super().close()
        self.server.shutdown()
        self.server.server_close()


class KVConsumer(ThreadedConnector):
    """Pulls a request's prompt blocks from the producer its kv_transfer_params name,
    when its config trusts that producer."""

    metrics_prefix = "kv_transfer"
    tiers = ("remote",)

    def __init__(
        self, config: KVTransferConfig, caches: Sequence[KVCache], fingerprint: bytes
    ) -> None:
        super().__init__(caches, fingerprint)
        self.producers = set(config.kv_producers)

    def _address(self, params: Mapping[str, Any] | None) -> tuple[str, int] | None:
        """The producer the params name, if it is one this consumer trusts."""
        if not params:
            return None
        host, port = params.get("remote_host"), params.get("remote_port")
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            return None
        if f"{host}:{port}" not in self.producers:
            logger.warning(
                "KV consumer: %s:%s is not in kv_producers %s; recomputing the prompt",
                host, port, sorted(self.producers),
            )  # fmt: skip
            return None
        return host, port

    def num_loadable_blocks(
        self, block_hashes: Sequence[bytes], transfer_params: Mapping[str, Any] | None
    ) -> int:
        """Every block, when the request names a producer: it computed the prompt just
        before (what it no longer holds is recomputed)."""
        if self._address(transfer_params) is None:
            return 0
        self.stats.blocks_looked_up += len(block_hashes)
        self.stats.hits["remote"] += len(block_hashes)
        return len(block_hashes)

    def wants_block(self, block_hash: bytes, evicted: bool) -> bool:
        return False

    def read(self, load: KVLoad) -> torch.Tensor:
        address = self._address(load.transfer_params)
        assert address is not None
        hashes = load.block_hashes
        if any(len(h) != HASH_BYTES for h in hashes):
            return self.no_rows()
        deadline = time.monotonic() + TRANSFER_DEADLINE_S
        try:
            with socket.create_connection(address, timeout=CONNECT_TIMEOUT_S) as sock:
                request = _REQUEST.pack(MAGIC, self.fingerprint, len(hashes))
                _send_all(sock, request + b"".join(hashes), deadline)
                reply = _read_exactly(sock, _REPLY.size, deadline)
                magic, fingerprint, status, count, block_bytes = _REPLY.unpack(reply)
                if (
                    magic != MAGIC
                    or status != OK
                    or fingerprint != self.fingerprint
                    or block_bytes != self.block_bytes
                ):
                    problem = (
                        "runs another model or KV format"
                        if status == WRONG_MODEL or fingerprint != self.fingerprint
                        else "answered something else"
                    )
                    logger.warning("KV consumer: the producer at %s:%d %s", *address, problem)
                    return self.no_rows()
                count = min(count, len(hashes))
                if count == 0:
                    return self.no_rows()
                payload = _read_exactly(sock, count * block_bytes, deadline)
        except (OSError, ConnectionError, struct.error) as e:
            logger.warning("KV consumer: no blocks from %s:%d: %s", *address, e)
            return self.no_rows()
        self.stats.blocks_loaded["remote"] += count
        return torch.frombuffer(payload, dtype=torch.uint8).view(count, block_bytes)
