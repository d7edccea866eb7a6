"""Tokenizers from GGUF metadata or tokenizer.json, and chat templates.

Tokenization is `transformers`' (a Rust `tokenizers` backend), built from the GGUF
file's vocabulary and merges exactly as `transformers` builds it for the reference
model, or read from a Hugging Face folder. Chat templates render as `transformers`
renders them, in its immutable Jinja sandbox, with time and size limits added
(`pagedllm.chat_template`): a template shipped in a model file can neither reach Python
internals nor hang or exhaust the server; one that tries (or fails any other way)
raises ValueError("chat template failed: ...").

Any Python string encodes. A lone surrogate ("\\ud800", which only Python code can
pass: the HTTP server refuses one in JSON as invalid) has no UTF-8 form and becomes
U+FFFD, as a browser's TextEncoder makes it, rather than a TypeError from the Rust
tokenizer. Null bytes, RTL marks and emoji are ordinary text.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pagedllm import cpu_kernels
from pagedllm.chat_template import check_template as check_template
from pagedllm.chat_template import render_template, template_variables, tools_system_prompt
from pagedllm.model.loader import ModelLoadError, resolve_model_path

Message = dict[str, Any]

_SURROGATE = re.compile("[\ud800-\udfff]")

# Tokens that end a chat turn, which a model may emit instead of its EOS: generation stops
# at them too (llama.cpp's end-of-generation set, vLLM's generation-config EOS ids).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")

# Gemma's turn format, for Gemma GGUFs that carry no chat template: a system message
# opens the first user turn, the assistant speaks as "model".
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if loop.first %}{{ ns.prefix }}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def tokenizer_cache_dir() -> Path:
    """Where tokenizers built from GGUF files are kept: beside the compiled kernels
    (~/.cache/pagedllm/tokenizers; `$PAGEDLLM_CACHE` moves both)."""
    return cpu_kernels.cache_dir().parent / "tokenizers"


def _gguf_tokenizer(path: Path) -> Any:
    """transformers' tokenizer of a GGUF file, built once per file and then read back
    from the cache: building it parses every vocabulary string of the file (13 s for
    Gemma 3's 262k tokens, against 0.5 s to read the saved tokenizer). The key is the
    file's path, size and modification time, and transformers' version."""
    import transformers
    from transformers import AutoTokenizer

    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    try:  # 0700 and ours (KernelCacheError otherwise): nobody else's files are read back
        root = cpu_kernels.private_dir(tokenizer_cache_dir())
    except OSError:  # no usable cache: built every time
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cached = root / hashlib.sha256(identity.encode()).hexdigest()[:24]
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(cached, ignore_errors=True)  # damaged: build it again
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    partial: Path | None = None
    try:  # best effort: a full disk only costs the next start the build again
        partial = Path(tempfile.mkdtemp(dir=root))
        hf.save_pretrained(str(partial))
        os.replace(partial, cached)  # whole or not at all, whoever races us
    except OSError:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
    return hf


class Tokenizer:
    """Text ↔ token ids for one model, plus its chat template."""

    def __init__(self, hf_tokenizer: Any, eos_token_id: int | None = None) -> None:
        self.hf = hf_tokenizer
        self.eos_token_id = eos_token_id if eos_token_id is not None else hf_tokenizer.eos_token_id
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.vocab_size = len(hf_tokenizer)
        self.end_of_turn_ids = [
            t
            for t in (self._token_id(token) for token in END_OF_TURN_TOKENS)
            if t is not None and t != self.eos_token_id
        ]

    def _token_id(self, token: str) -> int | None:
        """The id of a token the vocabulary has as a whole, or None."""
        token_id = self.hf.convert_tokens_to_ids(token)
        if token_id is None or self.hf.convert_ids_to_tokens(token_id) != token:
            return None
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is added only where the model's tokenizer adds it."""
        text = _SURROGATE.sub("\ufffd", text)
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; ids past the vocabulary decode to nothing, negative ones raise."""
        try:
            return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        except (OverflowError, TypeError) as e:  # the Rust side refuses ids < 0 or > 2**32
            raise ValueError(f"token ids must be integers in [0, {self.vocab_size}): {e}") from e

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
        tools: list[dict[str, Any]] | None = None,
        extra_variables: dict[str, Any] | None = None,
    ) -> str:
        """Render a conversation with the model's template (or `chat_template`), sandboxed and
        bounded in time and size (see `pagedllm.chat_template`). `tools` (OpenAI's entries)
        go to a template that renders them; one that does not gets them in a system
        message (Hermes' words, which tool_calls.py parses). `extra_variables` are more
        variables for the template (vLLM's chat_template_kwargs, e.g. enable_thinking)."""
        if not (chat_template or self.has_chat_template):
            raise ValueError("this model has no chat template; pass chat_template or use prompts")
        try:
            template = self.hf.get_chat_template(chat_template)  # a name picks one of several
            if tools and "tools" not in template:
                messages = _with_tools_prompt(messages, tools)
                tools = None
            variables = template_variables(
                messages, add_generation_prompt, self.hf.special_tokens_map, tools
            )
            if extra_variables:  # vLLM's chat_template_kwargs: never the conversation itself
                reserved = set(variables) & set(extra_variables)
                if reserved:
                    raise ValueError(f"chat_template_kwargs may not set {sorted(reserved)}")
                variables = {**variables, **extra_variables}
            return render_template(template, variables)
        except Exception as e:  # a template's own error (raise_exception, sandbox refusals, limits)
            raise ValueError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation; the template itself places special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _with_tools_prompt(messages: list[Message], tools: list[dict[str, Any]]) -> list[Message]:
    """The conversation with the tools described in its system message (added if none)."""
    prompt = tools_system_prompt(tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{prompt}".lstrip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def load_tokenizer(model: str | Path | None) -> Tokenizer:
    """The tokenizer of a GGUF file or a Hugging Face folder (never fetched from a hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        if path.is_file():
            hf = _gguf_tokenizer(path)
        else:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(path, f"cannot build the tokenizer ({e})") from e
    tokenizer = Tokenizer(hf)
    if not tokenizer.has_chat_template and tokenizer._token_id("<start_of_turn>") is not None:
        hf.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer
