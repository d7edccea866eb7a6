"""Gemma 3 (text) over a paged KV cache.

What sets it apart from Llama, as transformers' Gemma3ForCausalLM computes it: the
embeddings are scaled by √hidden; every block is normalised before and after
(RMSNorm by 1 + w); queries and keys get their own RMSNorm per head before the rotation;
the MLP gates with tanh-GELU; five layers of six attend to a sliding window of recent
positions with a rotary base of their own, the sixth to everything (with the file's rope
scaling); queries are scaled by `query_pre_attn_scalar`; the LM head is the embedding.
The window lives on each layer's KV cache (`KVCache.sliding_window`), so every attention
backend applies it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pagedllm.attention import AttentionMetadata, KVCache
from pagedllm.model.config import ModelArchConfig
from pagedllm.model.layers.activation import gelu_tanh_and_mul
from pagedllm.model.layers.linear import Embedding, Linear, WeightPart
from pagedllm.model.layers.rms_norm import RMSNorm
from pagedllm.model.layers.rotary import RotaryEmbedding
from pagedllm.model.models.llama import (
    LlamaAttention,
    LlamaMLP,
    build_rotary,
    check_shapes,
    projection_shapes,
)

CosSin = tuple[torch.Tensor, torch.Tensor]


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelArchConfig, layer: int) -> None:
        super().__init__()
        self.is_sliding = config.layer_window(layer) is not None
        self.self_attn = LlamaAttention(config)  # with Q/K norms and Gemma's scale
        self.mlp = LlamaMLP(config, gelu_tanh_and_mul)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(
        self, hidden: torch.Tensor, cos_sin: CosSin, kv_cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden), cos_sin, kv_cache, meta)
        hidden = hidden + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp)


# Gemma's RMSNorm multiplies by (1 + w); GGUF files store 1 + w already, Hugging Face
# checkpoints store w. Norms are kept as the multiplier.
_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "self_attn.q_norm",
    "self_attn.k_norm",
)


class Gemma3ForCausalLM(nn.Module):
    """Gemma 3 text model; `forward` returns hidden states, `compute_logits` the logits."""

    fused_decode = False  # the C decode layer is Llama's shape

    def __init__(self, config: ModelArchConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_global: RotaryEmbedding | None = None
        self.rotary_local: RotaryEmbedding | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        assert self.rotary_global is not None and self.rotary_local is not None
        hidden = self.embed_tokens(input_ids)
        hidden = hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)
        global_angles = self.rotary_global.cos_sin(positions, hidden.dtype)
        local_angles = self.rotary_local.cos_sin(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            angles = local_angles if layer.is_sliding else global_angles
            hidden = layer(hidden, angles, kv_cache, meta.for_group(kv_cache.group))
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- loading ---------------------------------------------------------------------------

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.config
        shapes = projection_shapes(c)
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            for norm in _NORMS:
                size = c.head_dim if norm.startswith("self_attn.") else c.hidden_size
                shapes[f"{p}{norm}.weight"] = (size,)
        return shapes

    def load_weights(
        self,
        tensors: dict[str, WeightPart],
        path: str | Path,
        dtype: torch.dtype,
        device: torch.device,
        exact_matmul: bool = False,
    ) -> None:
        check_shapes(self.expected_shapes(), {k: tuple(v.shape) for k, v in tensors.items()}, path)
        # GGUF norms are the multiplier already (llama.cpp's converter adds the 1); the
        # loader reads a file as GGUF and a folder as Hugging Face safetensors
        add_one = not Path(path).is_file()

        def norm(module: RMSNorm, name: str) -> None:
            value = tensors[name]
            assert isinstance(value, torch.Tensor), f"{name} must be a dense tensor"
            weight = value.float() + 1 if add_one else value.float()
            module.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)

        def linear(layer: Linear, names: list[str]) -> None:
            layer.load([tensors[n] for n in names], None, device, exact_matmul)

        embedding = tensors["model.embed_tokens.weight"]
        self.embed_tokens.load(embedding, dtype, device)
        self.lm_head.load([tensors.get("lm_head.weight", embedding)], None, device, exact_matmul)
        if self.config.tie_word_embeddings and isinstance(embedding, torch.Tensor):
            self.lm_head.weight = self.embed_tokens.weight  # one table, not two
        norm(self.norm, "model.norm.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            linear(layer.self_attn.qkv_proj, [attn + f"{x}_proj.weight" for x in "qkv"])
            linear(layer.self_attn.o_proj, [attn + "o_proj.weight"])
            linear(layer.mlp.gate_up_proj, [mlp + "gate_proj.weight", mlp + "up_proj.weight"])
            linear(layer.mlp.down_proj, [mlp + "down_proj.weight"])
            for name in _NORMS:
                norm(layer.get_submodule(name), f"{p}{name}.weight")
        c = self.config
        self.rotary_global = build_rotary(c, c.rope_theta, c.rope_scaling, path).to(device)
        local_theta = c.rope_local_theta or c.rope_theta
        self.rotary_local = build_rotary(c, local_theta, None, path).to(device)
