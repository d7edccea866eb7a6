"""Tensor parallelism: which share of a model one rank holds, and the collectives joining them.

A Llama-shaped layer splits as Megatron-LM does: Q/K/V and gate/up by output rows
(whole heads, whole 32-value blocks of the intermediate size), O and down by input
columns, so each rank's O and down products are partial sums that one all-reduce
adds; the embedding and the LM head split by vocabulary rows (an all-reduce of the
looked-up rows, an all-gather of the logits). Quantized weights split by whole blocks
of 32 values, as `QuantizedWeight` keeps them, so no rank dequantizes anything. Each
rank's KV cache holds only its KV heads, so the pool grows with the ranks.

Heads split by KV-head groups, so a query head always sits with its KV head: with fewer
ranks than KV heads the groups are shared out as evenly as they go (SmolLM2-135M's 3
KV heads over 2 ranks: 2 and 1); with more, each KV head is copied to the ranks that
split its query heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagedllm.model.config import ModelArchConfig
from pagedllm.model.layers.quantized import QuantizedWeight

WeightPart = torch.Tensor | QuantizedWeight
BLOCK = 32  # the columns of one repacked quantized block: row-parallel splits fall on them
TENSOR_PARALLEL_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _even(total: int, parts: int, index: int) -> tuple[int, int]:
    """The `index`-th of `parts` contiguous ranges covering [0, total), sizes differing by
    at most one, the larger first."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclass(frozen=True)
class Shard:
    """The ranges of heads, intermediate columns and vocabulary rows one rank holds."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_chunk: int  # every rank's logits are padded to this many columns to be gathered


def shard_for(config: ModelArchConfig, size: int, rank: int) -> Shard:
    """Rank `rank`'s share of `config` among `size` ranks, or a ValueError saying why the
    model does not split that way."""
    if config.architecture not in TENSOR_PARALLEL_ARCHITECTURES:
        raise ValueError(
            f"tensor parallelism supports the {', '.join(sorted(TENSOR_PARALLEL_ARCHITECTURES))} "
            f"architectures, not {config.architecture!r}"
        )
    heads, kv_heads = config.num_heads, config.num_kv_heads
    group = heads // kv_heads  # query heads per KV head
    if size <= kv_heads:
        kv = _even(kv_heads, size, rank)
        q = (kv[0] * group, kv[1] * group)
    else:
        copies = size // kv_heads  # ranks sharing one KV head
        if size % kv_heads or group % copies:
            raise ValueError(
                f"tensor_parallel_size {size} does not split {heads} query heads over "
                f"{kv_heads} KV heads: use at most {kv_heads} ranks, or a multiple of "
                f"{kv_heads} that divides the {group} query heads of each"
            )
        kv_head, part = divmod(rank, copies)
        kv = (kv_head, kv_head + 1)
        per = group // copies
        q = (kv_head * group + part * per, kv_head * group + (part + 1) * per)
    inter = config.intermediate_size
    if inter % BLOCK:
        lo, hi = _even(inter, size, rank)
    else:
        lo, hi = (BLOCK * x for x in _even(inter // BLOCK, size, rank))
    chunk = -(-config.vocab_size // size)
    vocab = (min(rank * chunk, config.vocab_size), min((rank + 1) * chunk, config.vocab_size))
    return Shard(q, kv, (lo, hi), vocab, chunk)


def local_config(config: ModelArchConfig, shard: Shard) -> ModelArchConfig:
    """The config of the model one rank builds: its heads, intermediate size and vocabulary."""
    return dataclasses.replace(
        config,
        num_heads=shard.q_heads[1] - shard.q_heads[0],
        num_kv_heads=shard.kv_heads[1] - shard.kv_heads[0],
        intermediate_size=shard.intermediate[1] - shard.intermediate[0],
        vocab_size=shard.vocab[1] - shard.vocab[0],
    )


def _rows(value: WeightPart, start: int, stop: int) -> WeightPart:
    if isinstance(value, QuantizedWeight):
        return value.map_rows(lambda t: t[start:stop])
    return value[start:stop].contiguous()


def _columns(value: WeightPart, start: int, stop: int, name: str) -> WeightPart:
    if isinstance(value, torch.Tensor):
        return value[:, start:stop].contiguous()
    if start % BLOCK or stop % BLOCK:
        raise ValueError(
            f"{name}: a quantized weight splits by whole blocks of {BLOCK} columns, "
            f"not at {start}:{stop}"
        )
    return value.columns(start // BLOCK, stop // BLOCK)


def shard_tensors(
    tensors: dict[str, WeightPart], config: ModelArchConfig, shard: Shard
) -> dict[str, WeightPart]:
    """The tensors (Hugging Face names, checked against the whole model) one rank keeps."""
    d = config.head_dim
    q0, q1 = (h * d for h in shard.q_heads)
    k0, k1 = (h * d for h in shard.kv_heads)
    i0, i1 = shard.intermediate
    v0, v1 = shard.vocab
    rows = {
        "q_proj.weight": (q0, q1),
        "q_proj.bias": (q0, q1),
        "k_proj.weight": (k0, k1),
        "k_proj.bias": (k0, k1),
        "v_proj.weight": (k0, k1),
        "v_proj.bias": (k0, k1),
        "gate_proj.weight": (i0, i1),
        "up_proj.weight": (i0, i1),
    }
    columns = {"o_proj.weight": (q0, q1), "down_proj.weight": (i0, i1)}
    out: dict[str, WeightPart] = {}
    for name, value in tensors.items():
        leaf = ".".join(name.rsplit(".", 2)[-2:])
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = _rows(value, v0, v1)
        elif leaf in rows and name.startswith("model.layers."):
            out[name] = _rows(value, *rows[leaf])
        elif leaf in columns and name.startswith("model.layers."):
            out[name] = _columns(value, *columns[leaf], name)
        else:
            out[name] = value  # norms, rotary factors: every rank keeps them whole
    return out


class CollectiveError(RuntimeError):
    """A collective failed: another rank died, or hung past the group's timeout. The
    ranks are out of step for good."""


def _collective(op: str, run: Callable[[], object]) -> None:
    try:
        run()
    except RuntimeError as e:
        raise CollectiveError(f"{op} across tensor-parallel ranks failed: {e}") from e


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group (torch.distributed's default group)."""

    rank: int
    size: int
    shard: Shard

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `partial` (in place)."""
        _collective("all_reduce", lambda: dist.all_reduce(partial))
        return partial

    def embed(self, embedding: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the whole vocabulary's embedding: each rank looks up the ids in its rows,
        zeros elsewhere, and the sum joins them (exactly: one term is non-zero)."""
        lo, hi = self.shard.vocab
        inside = (ids >= lo) & (ids < hi)
        rows = embedding(torch.where(inside, ids - lo, 0))
        rows = rows * inside.unsqueeze(-1).to(rows.dtype)
        return self.all_reduce(rows)

    def gather_logits(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's columns of the logits side by side: [rows, vocab_size]."""
        chunk = self.shard.vocab_chunk
        if local.shape[-1] < chunk:  # the last rank's share is short: pad to gather
            local = torch.nn.functional.pad(local, (0, chunk - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in range(self.size)]
        local = local.contiguous()
        _collective("all_gather", lambda: dist.all_gather(parts, local))
        return torch.cat(parts, dim=-1)[..., :vocab_size]


def tensor_parallel_for(config: ModelArchConfig) -> TensorParallel | None:
    """This process's share when torch.distributed is initialised with more than one rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    size, rank = dist.get_world_size(), dist.get_rank()
    return TensorParallel(rank, size, shard_for(config, size, rank))
