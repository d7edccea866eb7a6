"""One rank of the model: it builds the model (its share under tensor parallelism),
sizes and allocates the KV cache, and runs the steps the engine sends it."""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from pagedllm.attention import select_attention
from pagedllm.attention.kv_cache import resolve_kv_cache_dtype
from pagedllm.config import EngineArgs
from pagedllm.core.sched_output import SchedulerOutput
from pagedllm.model.config import ModelArchConfig
from pagedllm.model.layers.quantized import QuantizedWeight
from pagedllm.model.loader import load_model, resolve_model_path
from pagedllm.model.models.llama import use_attention_backend
from pagedllm.model.parallel import local_config
from pagedllm.spec_decode import load_draft_model
from pagedllm.worker.kv_cache import (
    allocate_kv_cache,
    bytes_per_block,
    kv_cache_groups,
    num_blocks_for_memory,
)
from pagedllm.worker.model_runner import ModelRunner, RunnerOutput

logger = logging.getLogger(__name__)

# How long a rank waits in a collective of a step for the others: past it a hung rank
# fails the engine (a dead one fails it at once: its sockets close).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("PAGEDLLM_TP_TIMEOUT_S", "120"))
STEP_WAIT_TIMEOUT = datetime.timedelta(days=365)  # an idle engine sends no step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and `taskset`
    narrow), so kernels and torch never run more threads than cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU, bfloat16 on CUDA where supported, else float16.

    On the CPU bf16 was 1.34x faster at batch 1 and no faster at batch 32 (no AMX),
    and its greedy tokens left fp32's within 32 tokens on some prompts: fp32 is the
    fastest faithful choice (BENCHMARKS.md, benchmarks/bench_dtype.py)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def init_distributed(
    rank: int, world_size: int, init_method: str, device: torch.device, local_rank: int | None
) -> dist.ProcessGroup:
    """Join the tensor-parallel group (gloo on the CPU, NCCL on CUDA; `local_rank`: the GPU,
    where the launcher says) and return the group
    that carries the steps: gloo, without a timeout that matters, as a rank may wait for
    the next step as long as the engine stays idle."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # one GPU per rank: LOCAL_RANK's, else by rank
        count = torch.cuda.device_count()
        gpu = rank % count if local_rank is None else local_rank
        if gpu >= count:
            raise ValueError(f"rank {rank} would need GPU {gpu} of this machine's {count}")
        torch.cuda.set_device(gpu)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    return dist.new_group(backend="gloo", timeout=STEP_WAIT_TIMEOUT)


class Worker:
    """The model, its KV cache and its runner, in this process, as rank `rank` of
    `world_size` (torch.distributed already joined when there are several)."""

    def __init__(self, args: EngineArgs, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        # Subnormal floats turn up in this model's activations and made CPU matmuls
        # 2-3x slower (measured: 742 → 224 ms per decode step under load); flushing
        # them to zero changes no logit beyond float tolerance.
        torch.set_flush_denormal(True)
        torch.set_num_threads(args.threads or max(1, usable_cores() // world_size))
        # oneDNN keeps every bf16 matmul kernel it compiles, one per shape (1,024 by
        # default, ~100 MB seen growing under a server's changing batches): bound it, above
        # the ~150 shapes the tiles' padded row counts make (model/layers/quantized.py)
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
        self.device = device = resolve_device(args.device)
        self.dtype = dtype = resolve_dtype(args.dtype, device)
        self.model_path = path = resolve_model_path(args.model)
        # refuses a max_model_len past the model's context
        self.model = load_model(
            path, dtype, device, exact_matmul=args.exact_matmul, max_model_len=args.max_model_len
        )
        config = self.model.config
        self.max_model_len = args.max_model_len or config.max_position_embeddings
        self.kv_cache_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, dtype)
        self.draft_model = None
        speculative = args.speculative
        if speculative is not None and speculative.method == "draft_model":
            self.draft_model = load_draft_model(
                speculative,
                config.vocab_size,
                dtype,
                device,
                exact_matmul=args.exact_matmul,
                max_model_len=self.max_model_len,
            )
        self.windows = layer_group_windows(config)
        if self.draft_model is not None and (
            self.windows != [None] or layer_group_windows(self.draft_model.config) != [None]
        ):  # refused before any KV is allocated
            raise ValueError(
                "draft-model speculation reaches the draft's KV through the target's one "
                "block table, so neither model may have sliding-window layers (their blocks "
                'are freed as the window moves); use {"method": "ngram"} with this model'
            )
        models = [m for m in (self.model, self.draft_model) if m is not None]
        backend = select_attention(device, self.kv_cache_dtype)
        for model in models:
            use_attention_backend(model, backend)
        # a draft model's KV pool has as many blocks as the target's (same tables)
        local_configs = [_built_config(m) for m in models]
        self.block_bytes = sum(
            bytes_per_block(c, args.block_size, self.kv_cache_dtype) for c in local_configs
        )
        num_blocks = args.num_kv_blocks or num_blocks_for_memory(
            self.block_bytes, device, args.kv_cache_memory
        )
        if world_size > 1:  # every rank's pool has as many blocks: the fewest any fits
            count = torch.tensor([num_blocks], device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            num_blocks = int(count.item())
        if num_blocks < 1:
            raise ValueError("kv_cache_memory is too small for one KV-cache block")
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_cache(
            local_configs[0], num_blocks, args.block_size, self.kv_cache_dtype, device
        )
        self.draft_caches = (
            allocate_kv_cache(
                local_configs[1], num_blocks, args.block_size, self.kv_cache_dtype, device
            )
            if self.draft_model is not None
            else []
        )
        self.runner = ModelRunner(self.model, self.kv_caches, args.block_size, device)
        self.runner.is_driver = rank == 0
        self.runner.sampler.generator = torch.Generator(device=device).manual_seed(args.seed)

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(output)

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (quantized blocks or dense tensors), each once
        (a tied LM head is the embedding's table)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        seen: set[int] = set()
        for module in self.model.modules():
            parts = [*getattr(module, "quantized_parts", []), getattr(module, "quantized", None)]
            for part in parts:
                if isinstance(part, QuantizedWeight) and id(part) not in seen:
                    seen.add(id(part))
                    total += part.nbytes
        return total


def layer_group_windows(config: ModelArchConfig) -> list[int | None]:
    """Each KV-cache layer group's sliding window (None: full attention)."""
    return [group.sliding_window for group in kv_cache_groups(config)]


def _built_config(model: torch.nn.Module) -> ModelArchConfig:
    """The config of what this rank holds: its share of the heads under tensor parallelism."""
    tp = getattr(model, "tensor_parallel", None)
    return model.config if tp is None else local_config(model.config, tp.shard)
