"""A Hugging Face folder of the default model loads and computes what the GGUF computes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from pagedllm.attention import AttentionMetadata
from pagedllm.model.loader import load_model
from pagedllm.tokenizer import load_tokenizer
from pagedllm.worker.kv_cache import allocate_kv_cache

pytestmark = pytest.mark.slow


def last_logits(model, ids):
    c = model.config
    kv = allocate_kv_cache(c, 8, 16, torch.float32, torch.device("cpu"))
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[5, 2, 7, 1]], 16)
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), meta.positions, kv, meta)[-1:])[0]


def test_safetensors_folder_matches_gguf(tmp_path, hf_reference, model_f32, tokenizer):
    folder = tmp_path / "smollm2-hf"
    # a plain (not GGUF-quantized) copy of the reference, which transformers can save
    config = copy.deepcopy(hf_reference.config)
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(hf_reference.state_dict())
    plain.save_pretrained(folder, max_shard_size="200MB")  # sharded, with an index
    tokenizer.hf.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    model = load_model(folder, torch.float32)
    assert model.config.num_layers == model_f32.config.num_layers
    ids = tokenizer.encode("A safetensors folder and a GGUF file hold the same weights.")
    diff = (last_logits(model, ids) - last_logits(model_f32, ids)).abs().max()
    assert diff < 1e-4, diff
    hf_tok = load_tokenizer(folder)
    assert hf_tok.encode("héllo wörld 🙂") == tokenizer.encode("héllo wörld 🙂")
    assert hf_tok.has_chat_template
