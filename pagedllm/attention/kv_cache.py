"""The paged KV cache of one layer: its storage tensors, their format and their scales.

Every reader and writer goes through this object (the write of a step's keys and values,
both attention paths, copy-on-write, the C kernels' view of it), so a storage format is
one class here: float caches (the model's dtype, or bf16/f16), int8 with one float16 scale per
(token, KV head) stored beside its block, and fp8 (e4m3 / e5m2) with one scale per layer
and half. Scales live with the blocks they describe, so copying a block copies them,
and prefix caching, preemption and beam search need nothing of their own.

Layout: `data` is [2, num_blocks, block_size, num_kv_heads, head_dim] (keys, then values);
a token's slot is a row of the flattened [num_blocks * block_size] view.
"""

from __future__ import annotations

import torch

# --kv-cache-dtype's choices (config.KV_CACHE_DTYPES) → storage dtype ("auto": the model's).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

# The C kernels' codes for the storage formats (paged_decode.c's KV_* enum).
KV_FORMATS: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.int8: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
}


class KVCache:
    """One layer's keys and values in `dtype`, read back as float (`read`)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.dtype = dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.c_view: object | None = None  # the C kernels' struct, made by cpu_decode
        # a sliding-window layer's span: its queries see only the last `sliding_window`
        # positions (set by whoever allocates the layer's cache; None: every position)
        self.sliding_window: int | None = None
        # the layer group whose block tables reach this cache (AttentionMetadata.for_group)
        self.group = 0
        self._init_scales()

    def _init_scales(self) -> None:
        """Formats with scales allocate them here (float formats have none)."""

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def format(self) -> int:
        """The C kernels' code for this cache's storage."""
        return KV_FORMATS[self.dtype]

    @classmethod
    def bytes_per_token(cls, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes a token takes in one layer, keys and values, scales included."""
        return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def _rows(self, half: int) -> torch.Tensor:
        """One half as [num_blocks * block_size, Hkv, D] slots, as raw bytes for fp8 (torch's
        CPU indexing ops do not take float8 tensors)."""
        return _raw(self.data[half].view(-1, self.num_kv_heads, self.head_dim))

    def write(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Store the new tokens' keys and values [T, Hkv, D] at their slots."""
        for half, x in enumerate((key, value)):
            if self.dtype == torch.float16:  # finite, as the C write stores it (not inf)
                x = x.clamp(-65504.0, 65504.0)
            self._rows(half).index_copy_(0, slots, _raw(x.to(self.dtype)))

    def read(self, half: int, block_table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The blocks of `block_table` ([..., n]) from one half (0 keys, 1 values), as
        [..., n * block_size, Hkv, D] in `dtype`: one sequence's (or a batch's) context."""
        return self._stored(half, block_table).to(dtype)

    def read_slots(self, half: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The tokens at `slots` [T] from one half, as [T, Hkv, D] in `dtype`."""
        return self._stored_slots(half, slots).to(dtype)

    def _stored(self, half: int, block_table: torch.Tensor) -> torch.Tensor:
        """The blocks of `block_table` as stored (in `dtype`, not yet scaled)."""
        return self._gather(_raw(self.data[half]), block_table).view(self.dtype)

    def _stored_slots(self, half: int, slots: torch.Tensor) -> torch.Tensor:
        return self._rows(half).index_select(0, slots).view(self.dtype)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy-on-write: duplicate blocks `src` into `dst` (with their scales)."""
        raw = _raw(self.data)
        raw[:, dst] = raw[:, src]

    @staticmethod
    def _gather(blocks: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """Blocks [num_blocks, block_size, ...] by table → [..., n * block_size, ...].

        `index_select` over whole blocks as rows copies each block in one piece: on the
        2-core CPU it gathered 64 tables of 24 blocks 6x faster than `blocks[table]`.
        """
        num_blocks, block_size = blocks.shape[:2]
        rows = blocks.reshape(num_blocks, -1).index_select(0, block_table.reshape(-1))
        return rows.view(
            *block_table.shape[:-1], block_size * block_table.shape[-1], *blocks.shape[2:]
        )


class Int8KVCache(KVCache):
    """Symmetric int8 with one float16 scale per (token, KV head) and half: the scale is
    the head's largest magnitude / 127, so each token keeps its own range. A float16 scale
    (11 bits, far finer than int8's steps) keeps a head of 64 values at 66 bytes: 1.94x a
    bf16 cache's tokens, where float32 scales gave 1.88x."""

    def _init_scales(self) -> None:
        shape = self.data.shape[:-1]  # [2, num_blocks, block_size, num_kv_heads]
        self.scales = torch.zeros(shape, dtype=torch.float16, device=self.device)

    @classmethod
    def bytes_per_token(cls, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_kv_heads * (head_dim + 2)

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, Hkv, D] → int8 values and float16 scales [T, Hkv], as the C write rounds:
        the scale to float16 first, then a true division by it, nearest even, clamped."""
        x = x.float()
        scale = (x.abs().amax(dim=-1) / 127).to(torch.float16)
        wide = scale.float()
        safe = torch.where(wide > 0, wide, torch.ones_like(wide))
        q = torch.round(x / safe[..., None]).clamp_(-127, 127)
        return q.to(torch.int8), scale

    def write(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        for half, x in enumerate((key, value)):
            q, scale = self.quantize(x)
            self._rows(half).index_copy_(0, slots, q)
            self.scales[half].view(-1, self.num_kv_heads).index_copy_(0, slots, scale)

    def read(self, half: int, block_table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        values = self._stored(half, block_table).float()
        scales = self._gather(self.scales[half], block_table)
        return (values * scales[..., None].float()).to(dtype)

    def read_slots(self, half: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        values = self._stored_slots(half, slots).float()
        scales = self.scales[half].view(-1, self.num_kv_heads).index_select(0, slots)
        return (values * scales[..., None].float()).to(dtype)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        super().copy_blocks(src, dst)
        self.scales[:, dst] = self.scales[:, src]


class Fp8KVCache(KVCache):
    """float8 (e4m3 or e5m2) with one scale per layer and half, stored value = x / scale,
    clamped to the format's largest finite value (torch's conversion alone makes NaN)."""

    def _init_scales(self) -> None:
        # 1.0 measured better than scales from a first prefill's largest values (BENCHMARKS)
        self.key_scale = self.value_scale = 1.0
        self.largest = torch.finfo(self.dtype).max

    def _scale(self, half: int) -> float:
        return self.key_scale if half == 0 else self.value_scale

    def _quantize(self, half: int, x: torch.Tensor) -> torch.Tensor:
        scaled = x.float() / self._scale(half)
        return scaled.clamp(-self.largest, self.largest).to(self.dtype)

    def write(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        for half, x in enumerate((key, value)):
            self._rows(half).index_copy_(0, slots, _raw(self._quantize(half, x)))

    def read(self, half: int, block_table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        values = self._stored(half, block_table).float()
        return (values * self._scale(half)).to(dtype)

    def read_slots(self, half: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self._stored_slots(half, slots).float() * self._scale(half)).to(dtype)


def _raw(x: torch.Tensor) -> torch.Tensor:
    """float8 tensors as their bytes (same storage), others as they are."""
    return x.view(torch.uint8) if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else x


def kv_cache_class(dtype: torch.dtype) -> type[KVCache]:
    """The class that stores `dtype`."""
    if dtype == torch.int8:
        return Int8KVCache
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return Fp8KVCache
    return KVCache


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype's storage dtype; `auto` is the model's."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_CACHE_DTYPES[name] or model_dtype


def make_kv_cache(*sizes: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> KVCache:
    """An empty cache of (num_blocks, block_size, num_kv_heads, head_dim) storing `dtype`."""
    return kv_cache_class(dtype)(*sizes, dtype, device)
