"""Engine configuration: the one source of truth for every tunable.

Each dataclass validates its own fields at construction, with an error naming the
field and the value, so the rest of the engine can trust what it is given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

SCHEDULER_POLICIES = ("fcfs", "priority")


@dataclass
class CacheConfig:
    """Shape of the paged KV cache and whether full blocks are shared by content."""

    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory / free device memory
    enable_prefix_caching: bool = True
    kv_cache_memory: float | None = None  # GiB; None: let the worker decide

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1, maximum=1024)
        if self.block_size & (self.block_size - 1):
            # Attention kernels index slots with shifts and masks.
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None:
            _check_int("num_blocks", self.num_blocks, minimum=1)
        _check_bool("enable_prefix_caching", self.enable_prefix_caching)
        if self.kv_cache_memory is not None:
            if isinstance(self.kv_cache_memory, bool) or not isinstance(
                self.kv_cache_memory, int | float
            ):
                raise ValueError(f"kv_cache_memory must be a number, got {self.kv_cache_memory!r}")
            if not math.isfinite(self.kv_cache_memory) or self.kv_cache_memory <= 0:
                raise ValueError(
                    f"kv_cache_memory must be a positive number of GiB, got {self.kv_cache_memory}"
                )


@dataclass
class SchedulerConfig:
    """Limits of one scheduling step and the order in which requests are served."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # or "priority": lower Request.priority value is served first
    max_waiting: int | None = None  # None: unbounded waiting queue

    def __post_init__(self) -> None:
        _check_int("max_num_seqs", self.max_num_seqs, minimum=1)
        _check_int("max_num_batched_tokens", self.max_num_batched_tokens, minimum=1)
        _check_int("max_model_len", self.max_model_len, minimum=2)
        _check_bool("enable_chunked_prefill", self.enable_chunked_prefill)
        if self.policy not in SCHEDULER_POLICIES:
            raise ValueError(f"policy must be one of {SCHEDULER_POLICIES}, got {self.policy!r}")
        if self.max_waiting is not None:
            _check_int("max_waiting", self.max_waiting, minimum=1)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            # Without chunking a prompt runs whole in one step, so a prompt as long as
            # the context must fit in one step's budget or it would wait forever.
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off, "
                f"got max_num_batched_tokens={self.max_num_batched_tokens} and "
                f"max_model_len={self.max_model_len}"
            )


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a boolean, got {value!r}")


DTYPES = ("auto", "float32", "bfloat16", "float16")
# vLLM's names; fp8 means e4m3; auto: the model's dtype (attention/kv_cache.py maps them)
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8", "fp8_e4m3", "fp8_e5m2")
SPECULATIVE_METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding, in vLLM's shape: `{"method": "ngram", "num_speculative_tokens":
    4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}` or `{"method": "draft_model",
    "model": PATH, "num_speculative_tokens": 4}` (a dict, or that JSON as text)."""

    method: str
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None  # the draft model (GGUF file or Hugging Face folder)

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_config method must be one of {SPECULATIVE_METHODS}, "
                f"got {self.method!r}"
            )
        _check_int("num_speculative_tokens", self.num_speculative_tokens, minimum=1, maximum=16)
        _check_int("prompt_lookup_min", self.prompt_lookup_min, minimum=1, maximum=64)
        _check_int("prompt_lookup_max", self.prompt_lookup_max, minimum=1, maximum=64)
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError(
                'speculative_config needs "model" (the draft model\'s path) with method '
                '"draft_model", and only then'
            )
        if self.model is not None and not (isinstance(self.model, str) and self.model):
            raise ValueError(f"speculative_config model must be a path, got {self.model!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) is more than "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )

    @classmethod
    def parse(cls, value: str | dict[str, Any] | None) -> SpeculativeConfig | None:
        """From `--speculative-config`'s JSON or `LLM(speculative_config=...)`'s dict."""
        return _from_json(cls, "speculative_config", value, required="method")


@dataclass(frozen=True)
class KVOffloadConfig:
    """Where KV blocks evicted from the pool are kept for later prefix hits, in the shape
    `{"host_gib": 4, "disk_path": PATH, "disk_gib": 20}` (a dict, or that JSON as text):
    a host-memory LRU of `host_gib` (0: none) in front of a disk tier under `disk_path`."""

    host_gib: float = 4.0
    disk_path: str | None = None
    disk_gib: float = 20.0

    def __post_init__(self) -> None:
        for name in ("host_gib", "disk_gib"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"kv_offload {name} must be a number of GiB, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"kv_offload {name} must be >= 0, got {value}")
        if self.disk_path is not None and not (isinstance(self.disk_path, str) and self.disk_path):
            raise ValueError(f"kv_offload disk_path must be a path, got {self.disk_path!r}")
        if self.disk_path is not None and self.disk_gib <= 0:
            raise ValueError("kv_offload disk_gib must be > 0 with a disk_path")
        if not self.host_gib and self.disk_path is None:
            raise ValueError("kv_offload needs host_gib > 0 or a disk_path")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | None) -> KVOffloadConfig | None:
        """From `--kv-offload`'s JSON or `LLM(kv_offload=...)`'s dict."""
        return _from_json(cls, "kv_offload", value)


KV_ROLES = ("kv_producer", "kv_consumer")


@dataclass(frozen=True)
class KVTransferConfig:
    """Prefill/decode disaggregation, in vLLM's shape: `{"kv_role": "kv_producer",
    "kv_ip": "127.0.0.1", "kv_port": 14579, "kv_buffer_gib": 2}`. A producer (prefill
    instance) keeps the KV blocks it computes in a host buffer of `kv_buffer_gib` and
    serves them on kv_ip:kv_port (the address it tells consumers: not 0.0.0.0); a
    consumer (decode instance) pulls a request's prompt blocks from the producer its
    `kv_transfer_params` name, if that producer is one of `kv_producers` ("host:port";
    default: the default producer address), never from an address a client made up.
    (`kv_connector` is accepted and ignored: there is one.)"""

    kv_role: str
    kv_ip: str = "127.0.0.1"
    kv_port: int = 14579
    kv_buffer_gib: float = 2.0
    kv_producers: tuple[str, ...] = ("127.0.0.1:14579",)
    kv_connector: str | None = None

    def __post_init__(self) -> None:
        if self.kv_role not in KV_ROLES:
            raise ValueError(
                f"kv_transfer_config kv_role must be one of {KV_ROLES}, got {self.kv_role!r}"
            )
        if not isinstance(self.kv_ip, str) or self.kv_ip in ("", "0.0.0.0", "::"):
            raise ValueError(
                "kv_transfer_config kv_ip must be the address consumers reach the producer "
                f"at (not a wildcard), got {self.kv_ip!r}"
            )
        producers = self.kv_producers
        if isinstance(producers, list):
            object.__setattr__(self, "kv_producers", producers := tuple(producers))
        if not isinstance(producers, tuple) or not all(
            isinstance(p, str) and p.rpartition(":")[2].isdigit() for p in producers
        ):
            raise ValueError(
                f'kv_transfer_config kv_producers must be a list of "host:port", got {producers!r}'
            )
        _check_int("kv_transfer_config kv_port", self.kv_port, minimum=0, maximum=65535)
        value = self.kv_buffer_gib
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"kv_transfer_config kv_buffer_gib must be > 0, got {value!r}")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | None) -> KVTransferConfig | None:
        """From `--kv-transfer-config`'s JSON or `LLM(kv_transfer_config=...)`'s dict."""
        return _from_json(cls, "kv_transfer_config", value, required="kv_role")


def _from_json(cls: Any, name: str, value: object, required: str | None = None) -> Any:
    """A config dataclass from its flag's JSON object (or a dict, or one already built;
    None stays None), refusing keys it does not have and a missing `required` one."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} is not JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    fields = set(cls.__dataclass_fields__)
    unknown = set(value) - fields
    if unknown:
        raise ValueError(f"{name} takes {sorted(fields)}, got unknown {sorted(unknown)}")
    if required is not None and required not in value:
        raise ValueError(
            f"{name} takes {sorted(fields)} ({required} required), got {sorted(value)}"
        )
    return cls(**value)


DEVICES = ("auto", "cpu", "cuda")
POOLING_CHOICES = ("auto", "last", "mean", "cls")


@dataclass
class EngineArgs:
    """Every engine argument, flat, as a user passes them to `LLM(...)` or the command line.

    The CLI flags are generated from these fields (names, defaults and the help in
    `ENGINE_ARG_HELP`), so this is the one place to add a tunable.
    """

    model: str | None = None  # GGUF file or Hugging Face folder; None: the default model
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: float | None = None  # GiB
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's context length
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    max_waiting: int | None = None
    seed: int = 0
    exact_matmul: bool = False
    threads: int | None = None  # None: every core the process may run on
    speculative_config: str | dict[str, Any] | None = None  # see SpeculativeConfig
    pooling: str = "auto"  # embedding requests: auto (the model's, else last), last, mean, cls
    kv_offload: str | dict[str, Any] | None = None  # see KVOffloadConfig
    kv_transfer_config: str | dict[str, Any] | None = None  # see KVTransferConfig
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        _check_bool("exact_matmul", self.exact_matmul)
        _check_int("tensor_parallel_size", self.tensor_parallel_size, minimum=1, maximum=1024)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1, maximum=4096)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be one of {DEVICES} or cuda:N, got {self.device!r}")
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, minimum=2)
        _check_int("seed", self.seed, minimum=0)
        if self.kv_cache_memory is not None and not (
            isinstance(self.kv_cache_memory, int | float) and self.kv_cache_memory > 0
        ):
            raise ValueError(
                f"kv_cache_memory must be a positive number of GiB, got {self.kv_cache_memory!r}"
            )
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"pooling must be one of {POOLING_CHOICES}, got {self.pooling!r}")
        # the parts validate themselves
        self.speculative = SpeculativeConfig.parse(self.speculative_config)
        self.kv_offload_config = KVOffloadConfig.parse(self.kv_offload)
        self.kv_transfer = KVTransferConfig.parse(self.kv_transfer_config)
        if self.kv_transfer is not None and self.kv_offload_config is not None:
            raise ValueError("kv_offload and kv_transfer_config cannot be combined (yet)")
        if (self.kv_offload_config or self.kv_transfer) and not self.enable_prefix_caching:
            raise ValueError(
                "kv_offload and kv_transfer_config move blocks by their prefix-cache hash: "
                "they need enable_prefix_caching"
            )
        if self.tensor_parallel_size > 1:
            self._check_tensor_parallel()
        self.cache_config(num_blocks=self.num_kv_blocks)
        self.scheduler_config(self.max_model_len or 2**20)

    def _check_tensor_parallel(self) -> None:
        """What does not run across ranks yet: it reads or writes rank 0's KV cache or
        model alone."""
        if self.kv_offload_config is not None or self.kv_transfer is not None:
            raise ValueError(
                "kv_offload and kv_transfer_config do not run with tensor_parallel_size > 1 yet"
            )
        if self.speculative is not None and self.speculative.method == "draft_model":
            raise ValueError(
                "a draft model does not run with tensor_parallel_size > 1 yet: use "
                '{"method": "ngram"}'
            )

    def cache_config(self, num_blocks: int | None) -> CacheConfig:
        return CacheConfig(
            block_size=self.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_memory=self.kv_cache_memory,
        )

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        return SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max(
                self.max_num_batched_tokens,
                0 if self.enable_chunked_prefill else max_model_len,
            ),
            max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            policy=self.scheduling_policy,
            max_waiting=self.max_waiting,
        )


ENGINE_ARG_HELP = {
    "model": "GGUF file or Hugging Face folder (default: the bundled SmolLM2-135M-Instruct Q4_1)",
    "dtype": "weights and activations dtype; auto: float32 on CPU, bfloat16 on CUDA",
    "kv_cache_dtype": "KV-cache storage: auto (the model's dtype), float32, bfloat16, float16, "
    "int8 (a scale per token and head), fp8 (= fp8_e4m3) or fp8_e5m2 (a scale per layer); "
    "int8 and fp8 fit ~4x the tokens of float32 in the same --kv-cache-memory",
    "device": "cpu, cuda or cuda:N; auto uses CUDA when present",
    "block_size": "tokens per KV-cache block",
    "num_kv_blocks": "KV-cache blocks (overrides --kv-cache-memory)",
    "kv_cache_memory": "KV-cache size in GiB (default: 1 on CPU, 90%% of free memory on CUDA)",
    "max_num_seqs": "most sequences running in one step",
    "max_num_batched_tokens": "token budget of one step",
    "max_model_len": "context length (default: the model's)",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes",
    "enable_chunked_prefill": "split long prompts across steps",
    "scheduling_policy": "fcfs or priority",
    "max_waiting": "most requests waiting; more are refused, by the server with 503 "
    "(default: unbounded; 1024 for serve)",
    "seed": "seed of the engine's shared random stream",
    "speculative_config": 'speculative decoding as JSON, e.g. \'{"method": "ngram", '
    '"num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}\' '
    'or \'{"method": "draft_model", "model": "PATH", "num_speculative_tokens": 4}\'',
    "pooling": "how embedding requests pool the prompt's hidden states: auto (the model's "
    "pooling type where its file names one, else last), last, mean or cls (normalised)",
    "kv_offload": "keep KV blocks evicted from the pool for later prefix hits, as JSON: "
    '\'{"host_gib": 4, "disk_path": "PATH", "disk_gib": 20}\' (a host-memory LRU, then files '
    "under disk_path that outlive the server; one tier is enough)",
    "kv_transfer_config": 'prefill/decode disaggregation, as JSON: \'{"kv_role": '
    '"kv_producer", "kv_ip": "127.0.0.1", "kv_port": 14579, "kv_buffer_gib": 2}\' on a '
    "prefill instance, kv_consumer on a decode instance; `pagedllm router` pairs them",
    "exact_matmul": "multiply quantized GGUF weights in float32 from their exact values "
    "(matches transformers; default: int8 activations, a scale per 16 values, as llama.cpp)",
    "threads": "CPU threads for kernels and torch, per rank (default: every core this process "
    "may use, shared between the tensor-parallel ranks)",
    "tensor_parallel_size": "split the model over this many processes (gloo on CPU, NCCL on "
    "CUDA): heads, MLP columns and vocabulary, weights and KV cache alike; under torchrun "
    "(RANK and WORLD_SIZE set) every rank runs the same command and rank 0 serves",
}
