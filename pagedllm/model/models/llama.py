"""The Llama family (Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2) over a paged KV cache.

The forward takes one flat batch of tokens from many sequences (no padding) and the
attention metadata that says which tokens belong to which sequence and where their
keys and values live; the caller keeps the KV cache and passes it in.
Q/K/V and gate/up projections are fused into one matrix each at load time, so a layer
runs four matrix products over the whole batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pagedllm.attention import AttentionMetadata, paged_attention
from pagedllm.model.config import ModelArchConfig
from pagedllm.model.layers.activation import silu_and_mul
from pagedllm.model.layers.linear import BlockQuantWeight, Linear
from pagedllm.model.layers.rms_norm import RMSNorm
from pagedllm.model.layers.rotary import RotaryEmbedding, rope_frequencies
from pagedllm.model.loader.errors import ModelLoadError


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


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(
            positions, self.input_layernorm(hidden), rotary, kv_cache, meta
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM; `forward` returns hidden states, `compute_logits` the logits."""

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch; writes each layer's K/V to kv_caches."""
        assert self.rotary is not None, "load_weights() first"
        hidden = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(positions, hidden, self.rotary, kv_cache, meta)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the rows that sample (the caller selects them first)."""
        return self.lm_head(hidden).float()

    # -- loading ---------------------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a file must provide (Hugging Face names) and its shape."""
        c = self.config
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
                p + "input_layernorm.weight": (c.hidden_size,),
                p + "post_attention_layernorm.weight": (c.hidden_size,),
            }
            if c.attention_bias:
                shapes |= {
                    p + "self_attn.q_proj.bias": (c.q_size,),
                    p + "self_attn.k_proj.bias": (c.kv_size,),
                    p + "self_attn.v_proj.bias": (c.kv_size,),
                }
        return shapes

    def load_weights(
        self,
        tensors: dict[str, torch.Tensor],
        path: str | Path,
        dtype: torch.dtype,
        device: torch.device,
        block_weights: dict[str, BlockQuantWeight] | None = None,
    ) -> None:
        """Check names and shapes against the config, fuse projections, move to device.

        `block_weights` (Hugging Face names → the file's quantized blocks) are attached to
        the matching linear layers for their small-batch path; pass them only where
        `block_quant_supported` says the kernels run.
        """
        check_shapes(self.expected_shapes(), {k: tuple(v.shape) for k, v in tensors.items()}, path)
        c = self.config
        state: dict[str, torch.Tensor] = {
            "embed_tokens.weight": tensors["model.embed_tokens.weight"],
            "norm.weight": tensors["model.norm.weight"],
            "lm_head.weight": tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]),
        }
        for i in range(c.num_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            attn, mlp = src + "self_attn.", src + "mlp."
            state[dst + "self_attn.qkv_proj.weight"] = torch.cat(
                [tensors[attn + f"{x}_proj.weight"] for x in "qkv"]
            )
            if c.attention_bias:
                state[dst + "self_attn.qkv_proj.bias"] = torch.cat(
                    [tensors[attn + f"{x}_proj.bias"] for x in "qkv"]
                )
            state[dst + "self_attn.o_proj.weight"] = tensors[attn + "o_proj.weight"]
            state[dst + "mlp.gate_up_proj.weight"] = torch.cat(
                [tensors[mlp + "gate_proj.weight"], tensors[mlp + "up_proj.weight"]]
            )
            state[dst + "mlp.down_proj.weight"] = tensors[mlp + "down_proj.weight"]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                state[dst + f"{norm}.weight"] = tensors[src + f"{norm}.weight"]
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        self.load_state_dict(state, strict=True, assign=True)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = self._build_rotary(tensors.get("rope_freqs"), path).to(device)
        if block_weights:
            self._attach_blocks(block_weights)

    def _attach_blocks(self, blocks: dict[str, BlockQuantWeight]) -> None:
        """Give each linear layer its weight's blocks (fused layers: the parts' rows, stacked)."""
        c = self.config
        cat = BlockQuantWeight.cat
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        self.lm_head.block_weight = blocks.get(head)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv_proj.block_weight = cat(
                [blocks.get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
            )
            attn.o_proj.block_weight = blocks.get(p + "self_attn.o_proj.weight")
            mlp.gate_up_proj.block_weight = cat(
                [blocks.get(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
            )
            mlp.down_proj.block_weight = blocks.get(p + "mlp.down_proj.weight")

    def _build_rotary(self, rope_freqs: torch.Tensor | None, path: str | Path) -> RotaryEmbedding:
        c = self.config
        try:
            inv_freq, scaling = rope_frequencies(
                c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings
            )
        except (KeyError, ValueError) as e:
            raise ModelLoadError(path, f"bad rope scaling {c.rope_scaling!r}: {e}") from e
        if rope_freqs is not None:  # llama.cpp stores Llama-3 scaling as per-frequency divisors
            if rope_freqs.numel() != inv_freq.numel():
                raise ModelLoadError(path, f"rope_freqs has {rope_freqs.numel()} entries")
            inv_freq = inv_freq / rope_freqs.float().flatten()
        return RotaryEmbedding(c.head_dim, c.max_position_embeddings, inv_freq, scaling)
