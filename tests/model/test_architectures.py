"""Every architecture we load, on tiny random-weight models built here: transformers
computes the reference logits at every position, the same weights are saved as a
Hugging Face folder (and, for Qwen, written as a GGUF with the `gguf` package), and
pagedllm's logits must match. Windows, Q/K norms, QKV bias and rope scaling are each
on some row of the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from pagedllm.attention import AttentionMetadata
from pagedllm.model.loader import load_model
from pagedllm.worker.kv_cache import allocate_kv_cache, kv_cache_groups
from tests.model.tiny_gguf import finish

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=512,
)
WINDOWED = ["sliding_attention", "sliding_attention", "full_attention"]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0}
CONFIGS: dict[str, PretrainedConfig] = {
    "qwen2 (QKV bias)": Qwen2Config(**SMALL),
    "qwen3 (Q/K norms)": Qwen3Config(**SMALL, head_dim=32),
    "gemma3 (windows)": Gemma3TextConfig(
        **SMALL, head_dim=32, sliding_window=8, layer_types=WINDOWED, query_pre_attn_scalar=24
    ),
    "mistral (window)": MistralConfig(**SMALL, sliding_window=8),
    # positions up to 80 past an original context of 32
    "llama (llama3 rope)": LlamaConfig(
        **SMALL,
        rope_parameters={**LLAMA3, "rope_theta": 10000.0, "original_max_position_embeddings": 32},
    ),
    "llama (yarn rope)": LlamaConfig(
        **SMALL,
        rope_parameters={**YARN, "rope_theta": 10000.0, "original_max_position_embeddings": 32},
    ),
}
LENGTH = 80


def random_model(config: PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def all_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """One prefill of `ids` over scattered blocks; logits at every position."""
    num_blocks = -(-len(ids) // 16)
    num_groups = len(kv_cache_groups(model.config))
    kv = allocate_kv_cache(
        model.config, num_groups * num_blocks + 3, 16, torch.float32, torch.device("cpu")
    )
    # each layer group its own blocks of the shared pool, in reverse order
    tables = [
        [list(range((g + 1) * num_blocks + 2, g * num_blocks + 2, -1))] for g in range(num_groups)
    ]
    meta = AttentionMetadata.build_grouped([len(ids)], [len(ids)], tables, 16)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), meta.positions, kv, meta))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory) -> tuple[str, torch.nn.Module, Path, list[int], torch.Tensor]:
    name = request.param
    hf = random_model(CONFIGS[name])
    folder = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(folder)
    ids = torch.randint(0, SMALL["vocab_size"], (LENGTH,), generator=torch.Generator()).tolist()
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
    return name, hf, folder, ids, reference


def test_safetensors_folder_logits_match_transformers(case):
    name, _, folder, ids, reference = case
    model = load_model(folder, torch.float32)
    for kind in ("llama3", "yarn"):
        if kind in name:
            assert model.config.rope_scaling["rope_type"] == kind
    torch.testing.assert_close(all_logits(model, ids), reference, atol=1e-4, rtol=1e-4)


def test_windows_are_what_makes_the_windowed_ones_match(case):
    """The check above can fail: the same model attending to everything differs."""
    name, _, folder, ids, reference = case
    model = load_model(folder, torch.float32)
    if model.config.sliding_window is None:
        pytest.skip(f"{name} has no window")
    model.config.sliding_window = None
    assert (all_logits(model, ids) - reference).abs().max() > 1e-3


# Hugging Face → llama.cpp names (Qwen's Q/K rows are not permuted by llama.cpp)
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_gguf(model: torch.nn.Module, arch: str, path: Path) -> Path:
    c = model.config
    writer = GGUFWriter(str(path), arch=arch)
    for key, value in {
        "block_count": c.num_hidden_layers,
        "embedding_length": c.hidden_size,
        "feed_forward_length": c.intermediate_size,
        "attention.head_count": c.num_attention_heads,
        "attention.head_count_kv": c.num_key_value_heads,
        "attention.key_length": getattr(c, "head_dim", None)
        or c.hidden_size // c.num_attention_heads,
        "context_length": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"])
    for name, tensor in model.state_dict().items():
        value = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            name = f"blk.{layer}.{_GGUF_LAYER_NAMES[module]}.{suffix}"
        else:
            name = {
                "model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight",
            }[name]
        writer.add_tensor(name, value)
    return finish(writer, path)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_logits_match_transformers(arch, tmp_path):
    [name] = [n for n in CONFIGS if n.startswith(arch)]
    hf = random_model(CONFIGS[name])
    ids = torch.randint(0, SMALL["vocab_size"], (LENGTH,), generator=torch.Generator()).tolist()
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0]
    model = load_model(write_gguf(hf, arch, tmp_path / f"{arch}.gguf"), torch.float32)
    assert model.config.qk_norm == (arch == "qwen3")
    assert model.config.attention_bias == (arch == "qwen2")
    torch.testing.assert_close(all_logits(model, ids), reference, atol=1e-4, rtol=1e-4)
