"""A bounds-checked walk over a GGUF header, run before gguf's reader sees the file.

`gguf.GGUFReader` trusts every size the file declares. A string or array length
past the end of the file is silently clamped (parsing then goes on from the wrong
place), an array count of 2⁶² makes it loop (and append) forever, and a tensor
whose data runs past the end fails with numpy's "cannot reshape". This walk reads
the header with `struct` over a memory map, checks each declared length, count and
tensor data range against the file's size before anything is built for it, and
reports the first problem by name. Once it passes, every read the reader makes is
in bounds and every loop it runs is bounded by the file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pagedllm.model.loader.errors import ModelLoadError

SUPPORTED_VERSIONS = (2, 3)  # the versions gguf's reader reads
MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUFReader keeps one numpy view per array element (~100 bytes each). The largest
# real vocabularies (~260k tokens, with scores, types and merges) hold about a
# million elements; 2²² bounds the reader's memory at a few hundred MB.
MAX_ARRAY_ELEMENTS = 1 << 22
# Arrays of arrays are legal; the reader recurses into them, so their depth is bounded.
MAX_ARRAY_DEPTH = 8
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one byte of value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class _Corrupt(Exception):
    """A problem found by the walk; `check_gguf_header` names the file."""


class _Walker:
    """A cursor over the file's bytes that refuses to read past the end."""

    def __init__(self, data: mmap.mmap | bytes, order: str) -> None:
        self.data = data
        self.size = len(data)
        self.order = order
        self.offset = 0
        self.array_elements = 0

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.offset:
            raise _Corrupt(
                f"{what} needs {n:,} bytes at byte {self.offset:,}, past the end of the file "
                f"({self.size:,} bytes)"
            )

    def unpack(self, fmt: str, what: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.offset)
        self.offset += size
        return value

    def u32(self, what: str) -> int:
        return int(self.unpack("I", what))

    def u64(self, what: str) -> int:
        return int(self.unpack("Q", what))

    def string(self, what: str) -> str:
        length = self.u64(f"{what} length")
        self.need(length, f"{what} ({length:,} bytes)")
        raw = bytes(self.data[self.offset : self.offset + length])
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Corrupt(f"{what} is not UTF-8 ({e})") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"{what} type")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"{what} has unknown value type {raw}") from None

    def skip_value(
        self, kind: GGUFValueType, what: str, depth: int = 0
    ) -> int | float | bool | str | None:
        """Step over one value; scalars and strings are returned, arrays are not."""
        if kind in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[kind], what)
        if kind == GGUFValueType.STRING:
            return self.string(what)
        if depth >= MAX_ARRAY_DEPTH:
            raise _Corrupt(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item = self.value_type(f"{what} item")
        count = self.u64(f"{what} count")
        self.array_elements += count
        if self.array_elements > MAX_ARRAY_ELEMENTS:
            raise _Corrupt(
                f"{what} declares {count:,} elements; the limit for all metadata arrays is "
                f"{MAX_ARRAY_ELEMENTS:,}"
            )
        if item in _SCALAR_FORMATS:
            self.need(count * struct.calcsize(_SCALAR_FORMATS[item]), f"{what} ({count:,} items)")
            self.offset += count * struct.calcsize(_SCALAR_FORMATS[item])
            return None
        self.need(count * 8, f"{what} ({count:,} items)")  # each string or array has a length
        for i in range(count):
            self.skip_value(item, f"{what}[{i}]", depth + 1)
        return None


def check_gguf_header(path: str | Path) -> None:
    """Raise ModelLoadError naming the first declared size that the file cannot hold."""
    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise ModelLoadError(path, "truncated or corrupt GGUF file (the file is empty)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                _walk(data)
            except _Corrupt as e:
                raise ModelLoadError(path, f"truncated or corrupt GGUF file ({e})") from None


def _walk(data: mmap.mmap | bytes) -> None:
    header = _Walker(data, "<")
    header.need(8, "the magic and version")
    version = struct.unpack_from("<I", data, 4)[0]
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        header.order = ">"
        version = struct.unpack_from(">I", data, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        raise _Corrupt(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    header.offset = 8
    tensor_count = header.u64("the tensor count")
    kv_count = header.u64("the metadata count")
    header.need(kv_count * _MIN_KV_BYTES, f"{kv_count:,} metadata entries")
    alignment = DEFAULT_ALIGNMENT
    for i in range(kv_count):
        key = header.string(f"metadata key #{i}")
        kind = header.value_type(f"metadata {key!r}")
        value = header.skip_value(kind, f"metadata {key!r}")
        if key == ALIGNMENT_KEY:
            alignment = _check_alignment(kind, value)
    header.need(tensor_count * _MIN_TENSOR_INFO_BYTES, f"{tensor_count:,} tensor descriptions")
    tensors = [_tensor_info(header, i) for i in range(tensor_count)]
    data_start = -(-header.offset // alignment) * alignment
    for name, offset, n_bytes in tensors:
        end = data_start + offset + n_bytes
        if end > header.size:
            raise _Corrupt(
                f"tensor {name!r} ({n_bytes:,} bytes) ends at byte {end:,}, past the end of "
                f"the file ({header.size:,} bytes)"
            )


def _check_alignment(kind: GGUFValueType, value: object) -> int:
    """general.alignment as llama.cpp accepts it: a uint32 power of two. Tensor data
    offsets are rounded up to it, so 0 would divide by zero and others misplace the data."""
    if kind != GGUFValueType.UINT32:
        raise _Corrupt(f"{ALIGNMENT_KEY} has type {kind.name}, expected UINT32")
    assert isinstance(value, int)
    if value <= 0 or value & (value - 1):
        raise _Corrupt(f"{ALIGNMENT_KEY} = {value} is not a positive power of two")
    return value


def _tensor_info(header: _Walker, i: int) -> tuple[str, int, int]:
    """(name, data offset, data bytes) of one tensor description; shapes checked."""
    name = header.string(f"tensor #{i} name")
    n_dims = header.u32(f"tensor {name!r} dimension count")
    if n_dims > MAX_DIMS:
        raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
    dims = [header.u64(f"tensor {name!r} dimensions") for _ in range(n_dims)]
    raw_type = header.u32(f"tensor {name!r} type")
    offset = header.u64(f"tensor {name!r} data offset")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {name!r} has unknown type {raw_type}") from None
    n_elements = 1
    for d in dims:
        n_elements *= d
    if dims and dims[0] % block:
        raise _Corrupt(f"tensor {name!r} rows of {dims[0]} are not whole blocks of {block}")
    return name, offset, n_elements // block * type_size
