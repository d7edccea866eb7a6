"""Any Unicode text encodes, decodes and renders through the chat template without a crash.

Hypothesis draws text from every Unicode category, lone surrogates ("\\ud800"), null
bytes, emoji and right-to-left marks included. Text without surrogates round-trips
exactly (the tokenizer is byte-level); a lone surrogate becomes U+FFFD. Hostile chat
templates that reach for Python internals fail with a ValueError from the sandbox.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SURROGATE = re.compile("[\ud800-\udfff]")
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)
# Every category, surrogates (Cs) included, plus the characters most likely to break things.
ANY_PIECE = st.characters(codec=None, categories=None) | st.sampled_from(
    ["\ud800", "\udfff", "\x00", "\u202e", "\u200f", "🙂", "👩‍👩‍👧", "\ufeff", "\r\n", "<|im_end|>"]
)
ANY_TEXT = st.lists(ANY_PIECE, max_size=40).map("".join)


@FUZZ
@given(text=ANY_TEXT)
def test_any_text_encodes_to_valid_ids(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)


@pytest.fixture(scope="module")
def missing_bytes(tokenizer) -> frozenset[int]:
    """Bytes the byte-level vocabulary has no token for (SmolLM2 lacks 21, e.g. 0x04, 0xF1).

    The BPE model drops such a byte silently, as the reference tokenizer does, so a
    character using one (U+0004, U+40000) cannot round-trip: its other bytes decode as
    U+FFFD. This is the model's vocabulary, not something the engine can repair.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = tokenizer.hf.get_vocab()
    return frozenset(b for b, char in bytes_to_unicode().items() if char not in vocab)


@FUZZ
@given(text=ANY_TEXT)
def test_text_round_trips_but_for_lone_surrogates_and_missing_bytes(tokenizer, missing_bytes, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    kept = bytes(b for b in SURROGATE.sub("\ufffd", text).encode() if b not in missing_bytes)
    assert tokenizer.decode(ids, skip_special_tokens=False) == kept.decode(errors="replace")


def test_lone_surrogate_becomes_replacement_character(tokenizer):
    """Regression: a lone surrogate used to raise TypeError from the Rust tokenizer."""
    assert tokenizer.encode("a\ud800b") == tokenizer.encode("a\ufffdb")
    assert tokenizer.encode("\udfff\ud800") == tokenizer.encode("\ufffd\ufffd")


@FUZZ
@given(ids=st.lists(st.integers(0, 49151), max_size=40), skip=st.booleans())
def test_any_token_ids_decode_to_text(tokenizer, ids, skip):
    assert isinstance(tokenizer.decode(ids, skip_special_tokens=skip), str)


@pytest.mark.parametrize("ids", [[-1], [5, -(2**40)], [2**64]])
def test_impossible_token_ids_are_a_value_error(tokenizer, ids):
    """Regression: a negative id used to escape as OverflowError."""
    with pytest.raises(ValueError, match="token ids must be integers"):
        tokenizer.decode(ids)


@FUZZ
@given(
    messages=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": ANY_TEXT}
        ),
        min_size=1,
        max_size=4,
    )
)
def test_chat_template_renders_any_content_as_data(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages)
    for m in messages:
        assert m["content"] in text
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_template_syntax_in_content_is_not_evaluated(tokenizer):
    content = "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %} {{ ''.__class__ }}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}])
    assert content in text and "49" not in text


HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__.os.system('true') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ dict.__class__.__init__.__globals__ }}",
    "{{ (messages|first).__class__.__init__.__globals__ }}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",  # only the immutable sandbox refuses
    "{{ messages[0].update({'content': 'x'}) }}",
    "{% set ns = namespace(__class__=1) %}",
    "{% for x in range(10**9) %}{% endfor %}",  # the sandbox's range limit
    "{% for m in messages %}{{ raise_exception('refused') }}{% endfor %}",
    "{{ unclosed",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_template_fails_with_a_value_error(tokenizer, template):
    with pytest.raises(ValueError, match="chat template failed") as info:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)
    # Each failure leaks nothing: no globals, no module, no list of classes.
    assert "<module" not in str(info.value) and "<class 'os" not in str(info.value)


def test_single_unsafe_lookup_is_refused_not_rendered_empty(tokenizer):
    """Regression: the sandbox alone rendered `{{ self._TemplateReference__context }}` as ''."""
    for template in ("{{ self._TemplateReference__context }}", "{{ cycler|attr('__init__') }}"):
        with pytest.raises(ValueError, match="private attribute"):
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}], chat_template=template
            )


def test_the_models_own_template_passes_the_check(tokenizer):
    from pagedllm.tokenizer import check_template

    check_template(tokenizer.hf.chat_template)  # no private attributes in a real template
