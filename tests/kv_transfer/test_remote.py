"""The producer/consumer transfer over a real socket, without a model: blocks arrive bit
for bit; an untrusted address, another model, a hung peer or a flood of connections
each cost a recomputation, never wrong KV or a stuck loader."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from pagedllm.config import KVTransferConfig
from pagedllm.core.kv_connector import KVLoad
from pagedllm.kv_transfer import remote
from pagedllm.kv_transfer.remote import KVConsumer, KVProducer
from tests.kv_transfer.test_offload_connector import caches, key, reported, snapshot, wipe

FP = b"m" * 32


@pytest.fixture
def producer():
    kv = caches(torch.int8)
    p = KVProducer(KVTransferConfig(kv_role="kv_producer", kv_port=0), kv, FP)
    p.start([(key(i), i, False) for i in (1, 2, 3)], [])  # computed blocks 1-3
    yield p, kv
    p.close()


def consumer(port: int, fingerprint: bytes = FP, dtype=torch.int8):
    config = KVTransferConfig(kv_role="kv_consumer", kv_producers=[f"127.0.0.1:{port}"])
    return KVConsumer(config, caches(dtype), fingerprint)


def test_blocks_arrive_bit_for_bit(producer):
    p, source = producer
    target = caches(torch.int8)
    config = KVTransferConfig(kv_role="kv_consumer", kv_producers=[f"127.0.0.1:{p.port}"])
    c = KVConsumer(config, target, FP)
    wipe(target, [5, 6, 7])
    params = p.transfer_params()
    assert c.num_loadable_blocks([key(1), key(2), key(9)], params) == 3  # optimistic
    c.start([], [KVLoad("r", [key(1), key(2), key(9)], [7, 5, 6], params)])
    assert reported(c) == {"r": 2}  # the producer never had block 9
    want, got = snapshot(source), snapshot(target)
    for w, g in zip(want, got, strict=True):
        assert torch.equal(g[:, 7], w[:, 1]) and torch.equal(g[:, 5], w[:, 2])
    assert c.stats.blocks_loaded == {"remote": 2} and c.stats.load_failures == 1


def test_untrusted_addresses_and_other_models_get_nothing(producer, caplog):
    p, _ = producer
    untrusted = consumer(p.port + 1 if p.port < 65535 else 1)
    assert untrusted.num_loadable_blocks([key(1)], p.transfer_params()) == 0
    assert "not in kv_producers" in caplog.text
    other_model = consumer(p.port, fingerprint=b"x" * 32)
    other_model.start([], [KVLoad("r", [key(1)], [4], p.transfer_params())])
    assert reported(other_model) == {"r": 0}
    assert "another model" in caplog.text
    other_format = consumer(p.port, dtype=torch.float32)  # same fingerprint, other layout
    other_format.start([], [KVLoad("r", [key(1)], [4], p.transfer_params())])
    assert reported(other_format) == {"r": 0}


def test_a_hung_producer_costs_the_deadline_not_the_engine(monkeypatch):
    monkeypatch.setattr(remote, "TRANSFER_DEADLINE_S", 0.5)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    held = []

    def accept_and_drip() -> None:  # answers one byte at a time, forever
        sock, _ = listener.accept()
        held.append(sock)
        for _ in range(100):
            try:
                sock.sendall(b"P")
            except OSError:
                return
            time.sleep(0.1)

    threading.Thread(target=accept_and_drip, daemon=True).start()
    c = consumer(port)
    params = {"remote_host": "127.0.0.1", "remote_port": port}
    started = time.monotonic()
    c.start([], [KVLoad("r", [key(1)], [4], params)])
    assert reported(c) == {"r": 0}
    assert time.monotonic() - started < 3
    listener.close()


def test_a_flood_of_connections_is_turned_away(producer, monkeypatch):
    p, _ = producer
    monkeypatch.setattr(remote, "TRANSFER_DEADLINE_S", 3.0)
    idle = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(remote.MAX_CONNECTIONS)]
    for _ in range(100):  # until every slot is held by a silent client
        if not p._slots._value:
            break
        time.sleep(0.02)
    c = consumer(p.port)
    c.start([], [KVLoad("r", [key(1)], [4], p.transfer_params())])
    assert reported(c) == {"r": 0}
    for sock in idle:
        sock.close()
    time.sleep(0.5)  # the server notices they left: the slots come back
    c.start([], [KVLoad("s", [key(1)], [4], p.transfer_params())])
    assert reported(c) == {"s": 1}


def test_the_producer_must_advertise_a_reachable_address():
    with pytest.raises(ValueError, match="not a wildcard"):
        KVTransferConfig(kv_role="kv_producer", kv_ip="0.0.0.0")
    with pytest.raises(ValueError, match="host:port"):
        KVTransferConfig(kv_role="kv_consumer", kv_producers=["nowhere"])
    with pytest.raises(ValueError, match="kv_role"):
        KVTransferConfig.parse('{"kv_ip": "127.0.0.1"}')
