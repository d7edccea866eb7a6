"""The tokenizer built from GGUF metadata matches transformers', and templates are sandboxed."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def reference_tokenizer(default_model_path):
    return AutoTokenizer.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name
    )


@pytest.mark.parametrize(
    "text", ["Hello world", "  leading spaces", "naïve café 🙂 日本語", "a\n\nb\tc", ""]
)
def test_encode_decode_match_reference(tokenizer, reference_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == reference_tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_special_tokens_from_metadata(tokenizer):
    assert tokenizer.eos_token_id == 2
    assert tokenizer.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.vocab_size == 49152


def test_chat_template_renders_roles(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids.count(2) == 2


def test_hostile_template_cannot_reach_python_internals(tokenizer):
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ValueError, match="chat template failed"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=hostile)
