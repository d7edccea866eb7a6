"""Corrupt GGUF files fail with one ModelLoadError naming the file: fast, small, never a crash.

Hypothesis mutates a tiny but complete GGUF file (tokenizer arrays included): random
byte flips, header integers (lengths, counts, types, dimensions, offsets, config values)
overwritten with huge or boundary values, and truncations. Every load must either
succeed (a flip inside tensor data is still a valid file) or raise ModelLoadError with
the path in its message, within a time budget (a hang is a failure) and a memory
budget (a declared size must be checked against the file before anything is
allocated for it).
"""

from __future__ import annotations

import re
import signal
import struct
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pagedllm.entrypoints.inspect_model import describe
from pagedllm.model.loader import ModelLoadError, load_model, read_model_config
from tests.model.tiny_gguf import write_tiny_gguf

SECONDS_PER_LOAD = 5.0
# The tiny file's tensors are ~0.4 MB; numpy's share of loading them stays far below this.
PEAK_BYTES = 64 * 1024 * 1024
FUZZ = settings(
    max_examples=150,
    deadline=None,  # the alarm below is the hard per-example limit
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no tracing "explain" reruns
)


class LoadHung(BaseException):
    """Raised by the alarm; a BaseException so no `except Exception` in the loader eats it."""


@contextmanager
def budget(seconds: float = SECONDS_PER_LOAD) -> Iterator[None]:
    """Fail if the body runs longer than `seconds` or numpy/Python allocate past PEAK_BYTES."""

    def alarm(signum: int, frame: object) -> None:
        raise LoadHung(f"the load ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"the load allocated {peak / 2**20:.0f} MiB"


def assert_loads_or_fails_cleanly(path: Path) -> None:
    """Load and inspect `path`: success is fine, a ModelLoadError naming it is fine, nothing else."""
    for load in (lambda: load_model(path, torch.float32), lambda: describe(path)):
        try:
            with budget():
                load()
        except ModelLoadError as e:
            assert str(path) in str(e), str(e)
            # an attempted huge allocation is a failure even when caught and wrapped
            assert not isinstance(e.__cause__, MemoryError), str(e)


class Base(bytes):
    """The valid file's bytes, with a short repr for Hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<tiny GGUF, {len(self)} bytes>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Base:
    """The base file, loaded once outside any budget (the first load imports half of torch)."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("base") / "tiny.gguf", with_vocab=True)
    load_model(path, torch.float32)
    return Base(path.read_bytes())


def header_ints(data: bytes, path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every integer in the header: lengths, counts, types, dims, offsets."""
    path.write_bytes(data)
    reader = GGUFReader(path)
    base = reader.data.ctypes.data
    found = set()
    for field in reader.fields.values():
        for part in field.parts:
            if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8) and part.size:
                offset = part.ctypes.data - base
                found |= {(offset + i * part.itemsize, part.itemsize) for i in range(part.size)}
    for tensor in reader.tensors:
        for part in tensor.field.parts:
            if part.dtype.kind in "ui" and part.size:
                offset = part.ctypes.data - base
                found |= {(offset + i * part.itemsize, part.itemsize) for i in range(part.size)}
    return sorted(found)


class Fields(list):
    def __repr__(self) -> str:
        return f"<{len(self)} header integers>"


@pytest.fixture(scope="module")
def tiny_ints(tiny, tmp_path_factory) -> Fields:
    return Fields(header_ints(tiny, tmp_path_factory.mktemp("probe") / "tiny.gguf"))


@pytest.fixture(scope="module")
def tiny_header_end(tiny, tmp_path_factory) -> int:
    path = tmp_path_factory.mktemp("probe") / "tiny.gguf"
    path.write_bytes(tiny)
    return GGUFReader(path).data_offset


BOUNDARY = [0, 1, 2, 3, 4, 5, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63]
BOUNDARY += [2**64 - 1, 2**64 - 8]


# ------------------------------------------------------------------- the base file is valid


def test_tiny_file_with_vocabulary_loads(tiny, tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(tiny)
    with budget():
        model = load_model(path, torch.float32)
    assert model.config.num_layers == 2


# ------------------------------------------------------------------- mutations


@FUZZ
@given(data=st.data())
def test_overwritten_header_integers_fail_cleanly(tiny, tiny_ints, tmp_path, data):
    path = tmp_path / "m.gguf"
    mutated = bytearray(tiny)
    for _ in range(data.draw(st.integers(1, 3), label="n")):
        offset, size = data.draw(st.sampled_from(tiny_ints), label="field")
        value = data.draw(
            st.sampled_from([*BOUNDARY, len(tiny), len(tiny) + 1]) | st.integers(0, 2**64 - 1),
            label="value",
        )
        mutated[offset : offset + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
    path.write_bytes(bytes(mutated))
    assert_loads_or_fails_cleanly(path)


@FUZZ
@given(data=st.data())
def test_flipped_bytes_fail_cleanly(tiny, tiny_header_end, tmp_path, data):
    end = tiny_header_end
    mutated = bytearray(tiny)
    # mostly the header, where a flip changes structure; sometimes anywhere
    where = st.integers(0, end - 1) | st.integers(0, len(tiny) - 1)
    for _ in range(data.draw(st.integers(1, 8), label="n")):
        mutated[data.draw(where, label="at")] = data.draw(st.integers(0, 255), label="byte")
    path = tmp_path / "f.gguf"
    path.write_bytes(bytes(mutated))
    assert_loads_or_fails_cleanly(path)


@settings(FUZZ, max_examples=100)
@given(cut=st.integers(0, 10**9))
def test_truncated_files_fail_cleanly(tiny, tmp_path, cut):
    path = tmp_path / "t.gguf"
    path.write_bytes(tiny[: cut % len(tiny)])
    assert_loads_or_fails_cleanly(path)


# ------------------------------------------------------------------- pinned cases


def offset_of(data: bytes, tmp_path: Path, pick) -> tuple[int, np.ndarray]:
    """(file offset, part) of the header part `pick(reader)` chooses in the valid file."""
    probe = tmp_path / "probe.gguf"
    probe.write_bytes(data)
    reader = GGUFReader(probe)
    part = pick(reader)
    return part.ctypes.data - reader.data.ctypes.data, part


def overwrite(data: bytes, offset: int, value: int, dtype=np.uint64) -> bytes:
    raw = np.array([value], dtype).tobytes()
    return data[:offset] + raw + data[offset + len(raw) :]


def expect_load_error(path: Path, data: bytes, pattern: str) -> str:
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match=pattern) as info, budget():
        load_model(path, torch.float32)
    assert str(path) in str(info.value)
    return str(info.value)


def test_tensor_larger_than_the_file_is_a_clear_error(tiny, tmp_path):
    """A dimension that makes a tensor's data run past the end of the file."""
    offset, _ = offset_of(
        tiny,
        tmp_path,
        lambda r: next(t for t in r.tensors if t.name == "token_embd.weight").field.parts[3],
    )
    rows = offset + 8  # the second dimension
    expect_load_error(
        tmp_path / "big.gguf",
        overwrite(tiny, rows, 10**6),
        r"tensor 'token_embd\.weight' \(256,000,000 bytes\) ends at byte .*past the end of the file",
    )


def test_tensor_offset_past_the_end_is_a_clear_error(tiny, tmp_path):
    offset, _ = offset_of(tiny, tmp_path, lambda r: r.tensors[-1].field.parts[5])
    expect_load_error(
        tmp_path / "far.gguf", overwrite(tiny, offset, 2**40), "past the end of the file"
    )


@pytest.mark.parametrize(
    "key", ["tokenizer.ggml.scores", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"]
)
def test_huge_array_count_is_refused_before_reading(tiny, tmp_path, key):
    """An array that claims 2⁶² elements: refused at once, not looped over or allocated."""
    offset, _ = offset_of(tiny, tmp_path, lambda r: r.fields[key].parts[4])
    message = expect_load_error(tmp_path / "a.gguf", overwrite(tiny, offset, 2**62), re.escape(key))
    assert "4,611,686,018,427,387,904" in message


def test_byte_array_with_a_huge_count_does_not_hang(tiny, tmp_path):
    """gguf's reader loops forever over a 1-byte-item array that claims 2⁴⁰ items (past
    the end each read is empty and advances nothing); refused here before it starts."""
    offset, _ = offset_of(tiny, tmp_path, lambda r: r.fields["tokenizer.ggml.scores"].parts[3])
    mutated = tiny[:offset] + struct.pack("<IQ", 0, 2**40) + tiny[offset + 12 :]  # uint8 x 2⁴⁰
    expect_load_error(tmp_path / "u8.gguf", mutated, "scores.*1,099,511,627,776 elements")


def test_array_count_past_the_end_is_refused(tiny, tmp_path):
    """A count under the element limit whose items still cannot fit in the file."""
    offset, _ = offset_of(tiny, tmp_path, lambda r: r.fields["tokenizer.ggml.scores"].parts[4])
    expect_load_error(
        tmp_path / "a.gguf", overwrite(tiny, offset, 1_000_000), "scores.*past the end of the file"
    )


def test_huge_string_length_is_refused(tiny, tmp_path):
    offset, _ = offset_of(tiny, tmp_path, lambda r: r.fields["tokenizer.chat_template"].parts[3])
    expect_load_error(
        tmp_path / "s.gguf",
        overwrite(tiny, offset, 2**63),
        "chat_template.*past the end of the file",
    )


def test_deeply_nested_arrays_are_refused(tmp_path):
    """Arrays of arrays 1,000 deep: refused before gguf's reader recurses into them."""
    header = struct.pack("<4sIQQ", b"GGUF", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
    header += struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 1000 + struct.pack("<IQ", 0, 0)
    expect_load_error(tmp_path / "n.gguf", header, "nests arrays more than 8 deep")


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("llama.block_count", 2**32 - 1, r"block_count = 4294967295 is not an integer in \[1, 2\]"),
        ("llama.context_length", 2**32 - 1, "context_length = 4294967295"),
        ("llama.embedding_length", 0, "embedding_length = 0"),
        ("llama.attention.head_count", 0, "head_count = 0"),
        ("llama.attention.head_count_kv", 0, "head_count_kv = 0"),
        ("llama.attention.head_count_kv", 3, "4 attention heads cannot be shared by 3 KV heads"),
        ("llama.feed_forward_length", 2**31, "feed_forward_length = 2147483648"),
        ("llama.vocab_size", 2**31, "vocab_size = 2147483648"),
        ("tokenizer.ggml.eos_token_id", 2**31, "eos_token_id = 2147483648"),
    ],
)
def test_absurd_config_values_are_clear_errors(tiny, tmp_path, key, value, pattern):
    """Config numbers that would build billions of layers, a 16 GiB rotary table or divide by 0."""
    offset, part = offset_of(tiny, tmp_path, lambda r: r.fields[key].parts[-1])
    expect_load_error(tmp_path / "c.gguf", overwrite(tiny, offset, value, part.dtype), pattern)


def test_qk_rows_that_do_not_split_into_heads_are_a_clear_error(tmp_path):
    """Found by the fuzzer: a 1-row K tensor crashed the un-permute (a RuntimeError)."""
    path = write_tiny_gguf(tmp_path / "k.gguf", reshape=("blk.0.attn_k.weight", (1, 64)))
    with pytest.raises(ModelLoadError, match="rows do not split into 2 heads of rotary pairs"):
        load_model(path, torch.float32)


def test_config_value_of_the_wrong_type_is_a_clear_error(tmp_path):
    """A string where a number belongs (int('abc') used to escape as a bare ValueError)."""
    path = write_tiny_gguf(tmp_path / "t.gguf", with_vocab=True, extra={"llama.block_count": "two"})
    with pytest.raises(ModelLoadError, match="block_count = 'two' is not an integer"):
        load_model(path, torch.float32)


# ------------------------------------------------------------------- the real file's header


@pytest.fixture(scope="module")
def real_header(default_model_path) -> bytes:
    with open(default_model_path, "rb") as f:
        return f.read(1_800_000)  # the vocabulary and merges end at byte 1,785,664


@settings(FUZZ, max_examples=8)
@given(cut=st.integers(24, 1_785_000))
def test_truncated_real_header_fails_cleanly(real_header, tmp_path, cut):
    path = tmp_path / "cut.gguf"
    path.write_bytes(real_header[:cut])
    with pytest.raises(ModelLoadError) as info, budget(10.0):
        read_model_config(path)
    assert str(path) in str(info.value)
