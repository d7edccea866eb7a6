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


def test_a_gguf_tokenizer_is_built_once_then_read_from_the_cache(
    tmp_path, monkeypatch, default_model_path
):
    from transformers import AutoTokenizer

    from pagedllm import tokenizer as tokenizer_module

    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path))
    built = []
    original = AutoTokenizer.from_pretrained

    def counting(*args, **kwargs):
        if "gguf_file" in kwargs:
            built.append(kwargs["gguf_file"])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counting)
    text = "Hello wörld 🙂\n\tdef f(x): return x"
    first = tokenizer_module.load_tokenizer(default_model_path)
    [cached] = list((tmp_path / "pagedllm" / "tokenizers").iterdir())
    second = tokenizer_module.load_tokenizer(default_model_path)
    assert len(built) == 1  # the second came from the cache
    assert second.encode(text) == first.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert second.apply_chat_template(messages) == first.apply_chat_template(messages)
    assert (second.eos_token_id, second.bos_token_id) == (first.eos_token_id, first.bos_token_id)
    (cached / "tokenizer.json").write_text("{not json")  # damaged: built again
    assert tokenizer_module.load_tokenizer(default_model_path).encode(text) == first.encode(text)
    assert len(built) == 2
    cached.parent.chmod(0o777)  # others may write there: not read, not written
    assert tokenizer_module.load_tokenizer(default_model_path).encode(text) == first.encode(text)
    assert len(built) == 3
