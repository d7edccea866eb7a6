"""Bad model input: one clear error naming the file and the problem; inspect exits 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType

from pagedllm.entrypoints.cli import main
from pagedllm.model.loader import ModelLoadError, load_model
from tests.model.tiny_gguf import write_tiny_gguf


def bad_inputs(tmp_path, default_model_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, I am not a model\n")
    data = default_model_path.read_bytes()
    cut_header = tmp_path / "cut-header.gguf"
    cut_header.write_bytes(data[:200_000])  # inside the vocabulary
    cut_data = tmp_path / "cut-data.gguf"
    cut_data.write_bytes(data[: len(data) // 2])  # header whole, tensor data cut
    no_config = tmp_path / "hf-folder"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    return {
        "no such file": tmp_path / "missing.gguf",
        "not a GGUF file": not_gguf,
        "truncated or corrupt GGUF file (": cut_header,
        "truncated or corrupt GGUF file (tensor": cut_data,
        "unknown architecture 'mamba9'": write_tiny_gguf(tmp_path / "arch.gguf", arch="mamba9"),
        "missing tensor 'model.layers.1.mlp.up_proj.weight'": write_tiny_gguf(
            tmp_path / "drop.gguf", drop="blk.1.ffn_up.weight"
        ),
        "tensor 'model.layers.0.self_attn.o_proj.weight' has shape (64, 32)": write_tiny_gguf(
            tmp_path / "shape.gguf", reshape=("blk.0.attn_output.weight", (64, 32))
        ),
        "unsupported quantization type Q8_1": write_tiny_gguf(
            tmp_path / "q81.gguf", raw_type=("blk.0.ffn_up.weight", GGMLQuantizationType.Q8_1)
        ),
        "folder has no config.json": no_config,
    }


@pytest.fixture
def cases(tmp_path, default_model_path):
    return bad_inputs(tmp_path, default_model_path)


def test_each_bad_input_raises_one_clear_error(cases):
    for problem, path in cases.items():
        with pytest.raises(ModelLoadError) as info:
            load_model(path, torch.float32)
        message = str(info.value)
        assert str(path) in message, message
        assert problem in message, message


def test_inspect_exits_2_without_traceback(cases, capsys):
    for problem, path in cases.items():
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert problem in err or "no such file" in err or "not a GGUF" in err, err
        assert "Traceback" not in err


def test_inspect_process_exit_status(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no such file" in result.stderr


def test_tiny_gguf_loads_and_runs(tmp_path):
    """The tiny file used above is otherwise valid: the errors come from the defects."""
    model = load_model(write_tiny_gguf(tmp_path / "ok.gguf"), torch.float32)
    assert model.config.num_layers == 2 and model.config.tie_word_embeddings


def test_bad_config_json_names_the_file(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load_model(folder, torch.float32)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="missing 'hidden_size'"):
        load_model(folder, torch.float32)


def test_inspect_shows_the_facts(default_model_path, capsys):
    assert main(["inspect", str(default_model_path)]) == 0
    out = capsys.readouterr().out
    for fact in (
        "architecture        llama",
        "134,515,008",
        "Q4_1: 210",
        "context length      8192",
        "vocabulary size     49152",
        "eos token           2 '<|im_end|>'",
        "chat template       yes",
        "float32: 46,080",
        "int8: 11,880",
    ):
        assert fact in out, out
