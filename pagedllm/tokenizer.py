"""Tokenizers from GGUF metadata or tokenizer.json, and chat templates.

Tokenization is `transformers`' (a Rust `tokenizers` backend), built from the GGUF
file's vocabulary and merges exactly as `transformers` builds it for the reference
model, or read from a Hugging Face folder. Chat templates render in `transformers`'
immutable Jinja sandbox, so a template shipped in a model file cannot reach Python
internals.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pagedllm.model.loader import ModelLoadError, resolve_model_path

Message = dict[str, Any]


class Tokenizer:
    """Text ↔ token ids for one model, plus its chat template."""

    def __init__(self, hf_tokenizer: Any, eos_token_id: int | None = None) -> None:
        self.hf = hf_tokenizer
        self.eos_token_id = eos_token_id if eos_token_id is not None else hf_tokenizer.eos_token_id
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added only where the model's tokenizer adds it."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(token_ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> str:
        """Render a conversation with the model's template (or `chat_template`), sandboxed."""
        if not (chat_template or self.has_chat_template):
            raise ValueError("this model has no chat template; pass chat_template or use prompts")
        try:
            return self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
            )
        except Exception as e:  # a template's own error (raise_exception, sandbox refusals, ...)
            raise ValueError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation; the template itself places special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(model: str | Path | None) -> Tokenizer:
    """The tokenizer of a GGUF file or a Hugging Face folder (never fetched from a hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        if path.is_file():
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(path, f"cannot build the tokenizer ({e})") from e
    return Tokenizer(hf)
