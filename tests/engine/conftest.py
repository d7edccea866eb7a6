"""Engine test fixtures."""

import pytest


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer):
    """The default model's transformers tokenizer (what the detokenizer is given)."""
    return tokenizer.hf
