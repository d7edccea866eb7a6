"""Loader limits: no rotary table sized by the file's context, and bad sizes or alignments in a
file are one ModelLoadError naming the file and the field, never a deeper traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

from pagedllm.model.config import ModelArchConfig
from pagedllm.model.layers.rotary import rope_frequencies
from pagedllm.model.loader import ModelLoadError, load_model, read_model_config
from pagedllm.model.loader import gguf as gguf_loader
from pagedllm.model.models.llama import LlamaForCausalLM, build_rotary
from tests.model.test_rotary import SCALINGS as ROTARY_SCALINGS
from tests.model.tiny_gguf import write_tiny_gguf

HUGE_CONTEXT = 2**24


def overwrite_field(path: Path, key: str, value: int) -> Path:
    """Rewrite the scalar metadata `key` of a GGUF file in place (same type, same size)."""
    reader = GGUFReader(path)
    part = reader.fields[key].parts[-1]
    offset = part.ctypes.data - reader.data.ctypes.data
    raw = np.array([value], part.dtype).tobytes()
    del reader  # release the memory map before writing
    data = bytearray(path.read_bytes())
    data[offset : offset + len(raw)] = raw
    path.write_bytes(bytes(data))
    return path


# ------------------------------------------------------------------- rotary angles


def test_a_huge_context_costs_no_rotary_table(tmp_path):
    """A file claiming 2²⁴ positions loads without a table of 2²⁴ rows (gigabytes): the
    model holds only its frequencies, and positions far out still rotate."""
    path = overwrite_field(
        write_tiny_gguf(tmp_path / "huge.gguf"), "llama.context_length", HUGE_CONTEXT
    )
    model = load_model(path, torch.float32)
    assert model.config.max_position_embeddings == HUGE_CONTEXT
    half = model.config.head_dim // 2  # the frequencies, once and twice over
    assert sum(b.numel() for b in model.rotary.buffers()) == half + 2 * half
    cos, sin = model.rotary.cos_sin(torch.tensor([HUGE_CONTEXT - 1]), torch.float32)
    torch.testing.assert_close(cos**2 + sin**2, torch.ones_like(cos))


def test_max_model_len_past_the_context_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ValueError, match=r"max_model_len \(257\) is longer than .* \(256\)"):
        load_model(path, torch.float32, max_model_len=257)


def meta_model(**config: object) -> LlamaForCausalLM:
    """A one-layer model without weights, for building its rotary table alone."""
    sizes = {"num_layers": 1, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2}
    sizes |= {"head_dim": 16, "intermediate_size": 128, "vocab_size": 100}
    with torch.device("meta"):
        return LlamaForCausalLM(ModelArchConfig("llama", **sizes, **config))  # type: ignore[arg-type]


# every scaling transformers tests, plus dynamic (which falls back on the context length)
SCALINGS = [{"rope_type": "dynamic", "factor": 4.0}, *ROTARY_SCALINGS]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_scaled_rotary_angles_are_the_table_transformers_would_build(scaling):
    """The per-step angles equal a precomputed table's rows bit for bit, scaled as the
    config's own context length says."""
    model = meta_model(rope_scaling=scaling, max_position_embeddings=HUGE_CONTEXT)
    c = model.config
    rotary = build_rotary(c, c.rope_theta, c.rope_scaling, "m.gguf")
    inv_freq, attention_scale = rope_frequencies(16, 10000.0, scaling, HUGE_CONTEXT)
    angles = torch.outer(torch.arange(48, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    positions = torch.tensor([47, 0, 5, 5, 30])
    cos, sin = rotary.cos_sin(positions, torch.float32)
    assert cos.shape == (5, 1, 16)
    table_cos, table_sin = angles.cos() * attention_scale, angles.sin() * attention_scale
    torch.testing.assert_close(cos[:, 0], table_cos[positions], rtol=0, atol=0)
    torch.testing.assert_close(sin[:, 0], table_sin[positions], rtol=0, atol=0)


def test_bad_rope_factor_is_a_load_error():
    model = meta_model(rope_scaling={"rope_type": "linear", "factor": 0})
    with pytest.raises(ModelLoadError, match=r"m\.gguf: bad rope scaling .*factor 0\.0"):
        build_rotary(model.config, 10000.0, model.config.rope_scaling, "m.gguf")


# ------------------------------------------------------------------- GGUF alignment


def write_aligned_gguf(path: Path, alignment: int = 64) -> Path:
    """A small GGUF file with an explicit general.alignment and one tensor after it."""
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_custom_alignment(alignment)
    writer.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_valid_alignment_opens(tmp_path):
    reader = gguf_loader.open_gguf(write_aligned_gguf(tmp_path / "ok.gguf"))
    assert reader.alignment == 64


@pytest.mark.parametrize("alignment", [0, 3, 48, 2**31 + 1, 2**32 - 1])
def test_bad_alignment_is_a_load_error(tmp_path, alignment):
    path = overwrite_field(write_aligned_gguf(tmp_path / "a.gguf"), "general.alignment", alignment)
    with pytest.raises(ModelLoadError) as info:
        load_model(path, torch.float32)
    message = str(info.value)
    assert str(path) in message and f"general.alignment = {alignment} " in message, message
    assert "power of two" in message, message


def test_alignment_of_the_wrong_type_is_a_load_error(tmp_path):
    path = write_tiny_gguf(tmp_path / "s.gguf", extra={"general.alignment": "32"})
    with pytest.raises(ModelLoadError, match=r"s\.gguf: .*general\.alignment has type STRING"):
        load_model(path, torch.float32)


def test_the_readers_own_alignment_error_names_the_file(tmp_path, monkeypatch):
    """If the header walk ever let one through, gguf's reader's error is still wrapped."""
    monkeypatch.setattr(gguf_loader, "check_gguf_header", lambda path: None)
    path = overwrite_field(write_aligned_gguf(tmp_path / "z.gguf"), "general.alignment", 0)
    with pytest.raises(ModelLoadError, match="alignment") as info:
        gguf_loader.open_gguf(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------- sizes in the config


def test_gguf_hidden_size_not_divisible_by_heads_is_a_load_error(tmp_path):
    path = overwrite_field(write_tiny_gguf(tmp_path / "h.gguf"), "llama.embedding_length", 66)
    with pytest.raises(ModelLoadError, match="embedding_length = 66 is not divisible by") as info:
        load_model(path, torch.float32)
    assert str(path) in str(info.value)


VALID_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 100,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
}

BAD_CONFIGS = [
    ({"hidden_size": 0}, "hidden_size = 0 is not an integer in"),
    ({"hidden_size": -64}, "hidden_size = -64 is not an integer in"),
    ({"num_attention_heads": 0}, "num_attention_heads = 0 is not an integer in"),
    ({"num_attention_heads": -4}, "num_attention_heads = -4 is not an integer in"),
    ({"num_key_value_heads": 0}, "num_key_value_heads = 0 is not an integer in"),
    ({"num_key_value_heads": -2}, "num_key_value_heads = -2 is not an integer in"),
    ({"num_hidden_layers": 0}, "num_hidden_layers = 0 is not an integer in"),
    ({"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is not an integer in"),
    ({"intermediate_size": 0}, "intermediate_size = 0 is not an integer in"),
    ({"vocab_size": -1}, "vocab_size = -1 is not an integer in"),
    ({"head_dim": 0}, "head_dim = 0 is not an integer in"),
    ({"head_dim": -16}, "head_dim = -16 is not an integer in"),
    ({"head_dim": 15}, "head_dim = 15 is odd"),
    ({"max_position_embeddings": 0}, "max_position_embeddings = 0 is not an integer in"),
    ({"max_position_embeddings": 2**40}, "max_position_embeddings = 1099511627776 is not"),
    ({"rms_norm_eps": 0}, "rms_norm_eps = 0.0 is not a positive number"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps = -1e-06 is not a positive number"),
    ({"rope_theta": 0}, "rope_theta = 0.0 is not a positive number"),
    ({"rope_parameters": {"rope_theta": -1.0}}, "rope_theta = -1.0 is not a positive number"),
    ({"hidden_size": "64"}, "hidden_size = '64' is not an integer"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers = 2.5 is not an integer"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps = 'small' is not a number"),
    ({"rope_scaling": [1, 2]}, "rope_scaling = [1, 2] is not a JSON object"),
    ({"rope_parameters": "yarn"}, "rope_parameters = 'yarn' is not a JSON object"),
    (
        {"hidden_size": 66},
        "hidden_size = 66 is not divisible by num_attention_heads = 4 (and head_dim is not given)",
    ),
    (
        {"num_key_value_heads": 3},
        "num_attention_heads = 4 is not divisible by num_key_value_heads = 3",
    ),
]


@pytest.mark.parametrize(
    "change,problem", BAD_CONFIGS, ids=[str(change) for change, _ in BAD_CONFIGS]
)
def test_bad_config_json_sizes_are_load_errors(tmp_path, change, problem):
    folder = tmp_path / "m"
    folder.mkdir()
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(VALID_CONFIG | change))
    for load in (lambda: read_model_config(folder), lambda: load_model(folder, torch.float32)):
        with pytest.raises(ModelLoadError) as info:
            load()
        assert str(info.value).startswith(f"{config_path}: {problem}"), str(info.value)
        assert info.value.__cause__ is None  # raised here, not wrapped from deeper code


def test_valid_config_json_reads(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(VALID_CONFIG | {"num_key_value_heads": None}))
    config = read_model_config(folder)
    assert (config.head_dim, config.num_kv_heads, config.num_layers) == (16, 4, 2)
    assert math.isclose(config.rms_norm_eps, 1e-5)
