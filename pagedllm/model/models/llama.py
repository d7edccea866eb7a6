"""The Llama family (Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2/2.5, Qwen3) over a
paged KV cache. Qwen2 adds a bias to Q/K/V, Qwen3 an RMSNorm per query and key head.

The forward takes one flat batch of tokens from many sequences (no padding) and the
attention metadata that says which tokens belong to which sequence and where their
keys and values live; the caller keeps the KV cache and passes it in.
Q/K/V and gate/up projections are fused into one matrix each at load time, so a layer
runs four matrix products over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagedllm.attention import (
    AttentionBackend,
    AttentionMetadata,
    KVCache,
    cpu_decode,
    paged_attention,
)
from pagedllm.model.config import ModelArchConfig
from pagedllm.model.layers import decode_layer
from pagedllm.model.layers.activation import silu_and_mul
from pagedllm.model.layers.linear import Embedding, Linear, WeightPart
from pagedllm.model.layers.quantized import MAX_ROWS, RMS_NORM, SILU_MUL, QuantizedWeight
from pagedllm.model.layers.rms_norm import RMSNorm
from pagedllm.model.layers.rotary import RotaryEmbedding, apply_rotary, rope_frequencies
from pagedllm.model.loader.errors import ModelLoadError
from pagedllm.model.parallel import TensorParallel


def check_shapes(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: str | Path
) -> None:
    """Every expected tensor is present with its shape, or a ModelLoadError says which is not."""
    for name, shape in expected.items():
        if name not in found:
            raise ModelLoadError(path, f"missing tensor {name!r}")
        if found[name] != shape:
            raise ModelLoadError(
                path, f"tensor {name!r} has shape {found[name]}, expected {shape} for this config"
            )


def projection_shapes(c: ModelArchConfig) -> dict[str, tuple[int, ...]]:
    """The tensors every Llama-shaped model has (Hugging Face names): embeddings, final
    norm, LM head unless tied, and each layer's attention and gated-MLP projections."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (c.q_size, c.hidden_size),
            p + "self_attn.k_proj.weight": (c.kv_size, c.hidden_size),
            p + "self_attn.v_proj.weight": (c.kv_size, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, c.q_size),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        }
    return shapes


def build_rotary(
    c: ModelArchConfig,
    theta: float,
    scaling: dict[str, Any] | None,
    path: str | Path,
    rope_freqs: torch.Tensor | None = None,
) -> RotaryEmbedding:
    """Rotary frequencies of base `theta` with `scaling` (and llama.cpp's per-frequency
    divisors `rope_freqs`, where a file stores Llama-3 scaling that way); a bad scaling is
    a ModelLoadError naming the file."""
    try:
        inv_freq, attention_scaling = rope_frequencies(
            c.head_dim, theta, scaling, c.max_position_embeddings
        )
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
        raise ModelLoadError(path, f"bad rope scaling {scaling!r}: {e}") from e
    if rope_freqs is not None:
        if rope_freqs.numel() != inv_freq.numel():
            raise ModelLoadError(path, f"rope_freqs has {rope_freqs.numel()} entries")
        inv_freq = inv_freq / rope_freqs.float().flatten()
    return RotaryEmbedding(c.head_dim, inv_freq, attention_scaling)


class LlamaAttention(nn.Module):
    tp: TensorParallel | None = None  # O's products are partial sums across ranks
    # the backend, chosen once per model build (`use_attention_backend`)
    attend: AttentionBackend = staticmethod(paged_attention)

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = (config.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        tokens, heads = qkv.shape[0], self.num_heads + self.num_kv_heads
        qk = qkv[:, : self.q_size + self.kv_size].view(tokens, heads, -1)
        if self.q_norm is not None and self.k_norm is not None:  # each head normed first
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            q = apply_rotary(self.q_norm(q), *cos_sin)
            k = apply_rotary(self.k_norm(k), *cos_sin)
        elif rotates_in_c(qkv):  # the same values in one C pass (a third of torch's time)
            q, k = cpu_decode.rotate_qk(
                qkv, cos_sin, self.num_heads, self.num_kv_heads, self.head_dim
            )
        else:  # Q and K sit side by side in the fused output: rotate them in one go
            q, k = apply_rotary(qk, *cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        out = self.attend(q, k, v, kv_cache, meta, self.scale)
        out = self.o_proj(out.reshape(-1, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


def rotates_in_c(qkv: torch.Tensor) -> bool:
    """Whether a fused projection's q and k can rotate in C: float32 rows on the CPU."""
    return (
        qkv.device.type == "cpu"
        and qkv.dtype == torch.float32
        and qkv.stride(1) == 1
        and cpu_decode.rotate_qk_kernel() is not None
    )


def use_attention_backend(model: nn.Module, backend: AttentionBackend) -> None:
    """Make every attention layer of `model` call `backend`."""
    for module in model.modules():
        if isinstance(module, LlamaAttention):
            module.attend = backend


class LlamaMLP(nn.Module):
    """The gated MLP: down(act(gate) * up), gate and up fused into one product."""

    tp: TensorParallel | None = None  # down's products are partial sums across ranks

    def __init__(
        self,
        config: ModelArchConfig,
        activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,
    ) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(self.activation(self.gate_up_proj(x)))
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos_sin, kv_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    # What `fused_decode` needs, gathered once at load (None where `can_fuse_decode` fails):
    # a decode step looks up no submodule, which nn.Module makes slow.
    decode_parts: tuple | None = None

    def can_fuse_decode(self) -> bool:
        """Whether decode steps can run as five C calls: each projection one quantized
        part without bias, float32 norms, and the fused attention kernel built."""
        projections = (
            self.self_attn.qkv_proj,
            self.self_attn.o_proj,
            self.mlp.gate_up_proj,
            self.mlp.down_proj,
        )
        return (
            all(
                len(p.quantized_parts) == 1
                and isinstance(p.quantized_parts[0], QuantizedWeight)
                and p.bias is None
                for p in projections
            )
            and self.self_attn.q_norm is None
            and self.input_layernorm.weight.dtype == torch.float32
            and self.post_attention_layernorm.weight.dtype == torch.float32
            and cpu_decode.paged_decode_rope_kernel() is not None
        )

    def gather_decode_parts(self) -> None:
        attn, mlp = self.self_attn, self.mlp
        norm_1, norm_2 = self.input_layernorm, self.post_attention_layernorm
        self.decode_parts = (
            attn.qkv_proj.quantized_parts[0],
            attn.o_proj.quantized_parts[0],
            mlp.gate_up_proj.quantized_parts[0],
            mlp.down_proj.quantized_parts[0],
            (norm_1.weight, norm_1.eps),
            (norm_2.weight, norm_2.eps),
            attn.num_heads,
            attn.scale,
        )

    _decode_call: decode_layer.DecodeLayer | None = None

    def decode_call(self, kv_cache: KVCache) -> decode_layer.DecodeLayer:
        """`fused_decode` as one C call, packed once per KV cache."""
        call = self._decode_call
        if call is None or call.kv_cache is not kv_cache:
            qkv_w, o_w, gate_up_w, down_w, norm_1, norm_2, heads, scale = self.decode_parts  # type: ignore[misc]
            weights = (qkv_w, o_w, gate_up_w, down_w)
            call = decode_layer.DecodeLayer(weights, (norm_1, norm_2), heads, scale, kv_cache)
            self._decode_call = call
        return call

    def fused_decode(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
        exact: bool,
    ) -> torch.Tensor:
        """The layer for a decode-only step, updating `hidden` in place: norm + QKV, rotary +
        KV write + attention, O + residual, norm + gate/up, SiLU·mul + down + residual.
        At batch 1 the ~20 torch calls these replace cost more than their arithmetic; at
        64 rows torch's elementwise ops on 2 threads cost as much again as in C. (A prefill
        chunk keeps torch's norms and SiLU: on 2,048 rows its vectorised ops took as long
        as these scalar C loops, BENCHMARKS.md issue 12; its rotary is C's.)"""
        qkv_w, o_w, gate_up_w, down_w, norm_1, norm_2, heads, scale = self.decode_parts  # type: ignore[misc]
        tokens = hidden.shape[0]
        qkv = torch.empty(tokens, qkv_w.shape[0])
        qkv_w.matmul(hidden, qkv, exact, RMS_NORM, norm_1)
        out = cpu_decode.paged_decode_rope(qkv, cos_sin, kv_cache, meta, heads, scale)
        o_w.matmul(out, hidden, exact, accumulate=True)
        gate_up = torch.empty(tokens, gate_up_w.shape[0])
        gate_up_w.matmul(hidden, gate_up, exact, RMS_NORM, norm_2)
        down_w.matmul(gate_up, hidden, exact, SILU_MUL, accumulate=True)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM; `forward` returns hidden states, `compute_logits` the logits."""

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch; writes each layer's K/V to kv_caches."""
        assert self.rotary is not None, "load_weights() first"
        tp = self.tensor_parallel
        hidden = (
            self.embed_tokens(input_ids) if tp is None else tp.embed(self.embed_tokens, input_ids)
        )
        cos_sin = self.rotary.cos_sin(positions, hidden.dtype)
        fused = (
            self.fused_decode
            and meta.decode_only
            and not meta.groups  # one step struct serves every layer: one block table
            and cpu_decode.supports(hidden, kv_caches[0])
        )
        exact = self.lm_head.exact
        if fused and hidden.shape[0] <= MAX_ROWS and decode_layer.available():
            step = decode_layer.DecodeStep(cos_sin, meta)
            return self.decode_stack(kv_caches)(hidden, step, exact)  # one call, normed too
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            if fused:  # more rows than one call takes: five C calls a layer
                hidden = layer.fused_decode(hidden, cos_sin, kv_cache, meta, exact)
            else:
                hidden = layer(hidden, cos_sin, kv_cache, meta.for_group(kv_cache.group))
        return self.norm(hidden)

    fused_decode = False  # every layer can run decode steps as C calls (set at load)
    _decode_stack: decode_layer.DecodeStack | None = None

    def decode_stack(self, kv_caches: list[KVCache]) -> decode_layer.DecodeStack:
        """Every layer's one-call decode for these caches and the final norm, packed once."""
        stack = self._decode_stack
        if stack is None or stack.kv_caches is not kv_caches:
            calls = [layer.decode_call(c) for layer, c in zip(self.layers, kv_caches, strict=True)]
            final_norm = (self.norm.weight, self.norm.eps)
            stack = self._decode_stack = decode_layer.DecodeStack(calls, kv_caches, final_norm)
        return stack

    tensor_parallel: TensorParallel | None = None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the rows that sample (the caller selects them first)."""
        logits = self.lm_head(hidden).float()
        tp = self.tensor_parallel
        return logits if tp is None else tp.gather_logits(logits, self.config.vocab_size)

    def use_tensor_parallel(self, tp: TensorParallel, config: ModelArchConfig) -> None:
        """Run as one rank's share (loaded from `shard_tensors`); `config` is the whole
        model's, which callers see. The one-call decode layers write the residual in
        place, before an all-reduce could join O's partial sums: they stay off."""
        self.tensor_parallel, self.config = tp, config
        for layer in self.layers:
            layer.self_attn.tp = layer.mlp.tp = tp
        self.fused_decode = False

    # -- loading ---------------------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a file must provide (Hugging Face names) and its shape."""
        c = self.config
        shapes = projection_shapes(c)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (c.hidden_size,),
                p + "post_attention_layernorm.weight": (c.hidden_size,),
            }
            if c.attention_bias:
                shapes |= {
                    p + "self_attn.q_proj.bias": (c.q_size,),
                    p + "self_attn.k_proj.bias": (c.kv_size,),
                    p + "self_attn.v_proj.bias": (c.kv_size,),
                }
            if c.qk_norm:
                shapes |= {
                    p + "self_attn.q_norm.weight": (c.head_dim,),
                    p + "self_attn.k_norm.weight": (c.head_dim,),
                }
        return shapes

    def load_weights(
        self,
        tensors: dict[str, WeightPart],
        path: str | Path,
        dtype: torch.dtype,
        device: torch.device,
        exact_matmul: bool = False,
    ) -> None:
        """Check names and shapes against the config, fuse projections, move to device.

        Quantized weights (`QuantizedWeight`) stay as they are: fused layers stack their
        parts' rows; `exact_matmul` is passed to every linear layer.
        """
        check_shapes(self.expected_shapes(), {k: tuple(v.shape) for k, v in tensors.items()}, path)
        c = self.config

        def dense(name: str) -> nn.Parameter:
            value = tensors[name]
            assert isinstance(value, torch.Tensor), f"{name} must be a dense tensor"
            return nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)

        def linear(layer: Linear, names: list[str], bias: list[str] | None = None) -> None:
            b = None
            if bias:
                b = torch.cat([tensors[n] for n in bias]).to(dtype)  # type: ignore[misc]
            layer.load([tensors[n] for n in names], b, device, exact_matmul)

        embedding = tensors["model.embed_tokens.weight"]
        self.embed_tokens.load(embedding, dtype, device)
        head = tensors.get("lm_head.weight", embedding)
        self.lm_head.load([head], None, device, exact_matmul)
        if c.tie_word_embeddings and isinstance(embedding, torch.Tensor):
            self.lm_head.weight = self.embed_tokens.weight  # one table, not two
        self.norm.weight = dense("model.norm.weight")
        for i, layer in enumerate(self.layers):
            src = f"model.layers.{i}."
            attn, mlp = src + "self_attn.", src + "mlp."
            linear(
                layer.self_attn.qkv_proj,
                [attn + f"{x}_proj.weight" for x in "qkv"],
                [attn + f"{x}_proj.bias" for x in "qkv"] if c.attention_bias else None,
            )
            linear(layer.self_attn.o_proj, [attn + "o_proj.weight"])
            linear(layer.mlp.gate_up_proj, [mlp + "gate_proj.weight", mlp + "up_proj.weight"])
            linear(layer.mlp.down_proj, [mlp + "down_proj.weight"])
            layer.input_layernorm.weight = dense(src + "input_layernorm.weight")
            layer.post_attention_layernorm.weight = dense(src + "post_attention_layernorm.weight")
            if layer.self_attn.q_norm is not None and layer.self_attn.k_norm is not None:
                layer.self_attn.q_norm.weight = dense(attn + "q_norm.weight")
                layer.self_attn.k_norm.weight = dense(attn + "k_norm.weight")
        rope_freqs = tensors.get("rope_freqs")
        c = self.config
        self.rotary = build_rotary(c, c.rope_theta, c.rope_scaling, path, rope_freqs).to(device)  # type: ignore[arg-type]
        self.fused_decode = dtype == torch.float32 and all(
            layer.can_fuse_decode() for layer in self.layers
        )
        for layer in self.layers if self.fused_decode else ():
            layer.gather_decode_parts()
