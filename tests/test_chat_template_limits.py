"""Chat templates render as transformers renders them, but bounded in time and memory.

A template comes from the model file, so it may be hostile: each one below must fail
with a clear ValueError within seconds and without a big allocation, never hang the
server or exhaust its memory. Times are asserted loosely (< 10 s) so that a busy
machine cannot make the tests flaky; the limit itself is `RENDER_SECONDS` (2 s).
"""

from __future__ import annotations

import time
import tracemalloc

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pagedllm.chat_template import RENDER_SECONDS, compile_template

USER = [{"role": "user", "content": "x"}]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "What is a page table?"},
        {"role": "assistant", "content": "Une table de pages…"},
        {"role": "user", "content": "naïve café 🙂 {{ 7 * 7 }} <|im_end|>"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "name": None}],
]

# A template using what real templates use: macros, namespace, loop filters and controls,
# tojson, `%` and .format, the generation tag, reasoning fields, special tokens.
RICH_TEMPLATE = """{{- bos_token }}
{%- macro render(role, text) -%}
<|{{ role }}|>{{ text | trim }}{{ eos_token }}
{% endmacro -%}
{%- set ns = namespace(system='', turns=0, last_user=-1) %}
{%- for m in messages %}
    {%- if m['role'] == 'system' %}{% set ns.system = ns.system ~ m['content'] ~ '\\n' %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- if ns.system %}{{ render('system', ns.system) }}{% endif %}
{%- if tools is not none %}{{ raise_exception('no tools here') }}{% endif %}
{%- for m in messages if m.role != 'system' %}
    {%- if m.role == 'assistant' %}
        {%- if m.reasoning_content is defined %}{{ '<think>' + m.reasoning_content + '</think>' }}{% endif %}
        {%- generation %}{{ render(m.role, m.content) }}{% endgeneration %}
    {%- elif m.role == 'user' %}
        {{- render(m.role, '%s (%d/%d)' % (m.content, loop.index, loop.length)) }}
    {%- else %}
        {{- render(m.role, m | tojson(indent=2, sort_keys=true)) }}
    {%- endif %}
    {%- if loop.last %}{{ '{} turns: {}'.format(ns.turns, messages | map(attribute='role') | join(',')) }}{% endif %}
{%- endfor %}
{%- for i in range(3) %}{{ i }}{% if i == 1 %}{% break %}{% endif %}{% endfor %}
{{ dict(a=1, b=[1, 2]) | tojson }} {{ [1, 2, 3] | sum }} {{ 'x' * 3 }} {{ 2 ** 10 }}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""

# Jinja constructs the guarded compiler rewrites (loops, `~`, literals, unpacking targets)
# or that buffer output (macros, call and filter blocks, block sets, recursive loops).
CONSTRUCTS_TEMPLATE = r"""{% for a, b in [(1, 2), (3, 4)] %}{{ a }}{{ b }}{% endfor %}
{% set x, y = 1, 2 %}{{ x ~ y }}
{% filter upper %}shout {{ messages[0].content }}{% endfilter %}
{% macro box(t) %}[{{ t }}|{{ caller() }}]{% endmacro %}{% call box('a') %}inner{% endcall %}
{% set blk %}block {{ 1 + 1 }}{% endset %}{{ blk }}
{% autoescape true %}{{ '<b>' }}{{ '<i>' ~ 'x' }}{% endautoescape %}
{% for item in [{'name': 'a', 'children': [{'name': 'b', 'children': []}]}] recursive -%}
{{ item.name }}({{ loop(item.children) }}){% endfor %}
{% for i in range(4) %}{{ loop.cycle('odd', 'even') }}{{ ',' if not loop.last }}{% endfor %}
{% set c = cycler('x', 'y') %}{{ c.next() }}{{ c.next() }}{{ c.next() }}
{% set j = joiner('; ') %}{% for i in range(3) %}{{ j() }}{{ i }}{% endfor %}
{{ 'abcdef'[1:4] }} {{ none|default('d') }} {{ {'b': 1, 'a': 2}|dictsort }} {{ {'k': 'v'}|items|list }}
{{ undefined_thing is defined }} {{ messages|tojson }} {{ 'é🙂'|tojson }} {{ 'é'|tojson(ensure_ascii=true) }}
{{ [3, 1, 2]|sort|join('-') }} {{ '%05.1f' % 3.14159 }} {{ '{:>6}|{:<4}'.format('r', 'l') }}
{{ 'x'|center(9) }}|{{ 'a\nb'|indent(2, true) }}|{{ 'hello world foo'|wordwrap(5) }}|{{ 'abc'|replace('b', 'BB') }}
{% for m in messages %}{% if loop.index0 > 5 %}{% break %}{% endif %}{{ loop.index }}{% else %}empty{% endfor %}
{% for m in [] %}x{% else %}empty{% endfor %}
{{ (1, 2) }} {{ [1, [2, (3,)]] }} {{ {'a': [1]} }} {{ range(2, 5)|sum }} {{ 7 // 2 }} {{ 7 % 3 }}
{{ 'ab' * 2 }} {{ [1] + [2] }} {{ 2 * 3.5 }} {{ 2 ** 0.5 }} {{ 'a' + 'b' }} {{ '%s' % 'x' }}"""

RICH_CONVERSATIONS = [
    *CONVERSATIONS,
    [
        {"role": "system", "content": "One."},
        {"role": "system", "content": "Two."},
        {"role": "user", "content": "  padded  "},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet them"},
        {"role": "tool", "content": "42", "name": None},
        {"role": "assistant", "content": "Done.", "thinking": "aliased"},
    ],
]


def _reference(tokenizer, messages, add_generation_prompt, chat_template=None):
    return tokenizer.hf.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_model_template_matches_transformers(tokenizer, messages, add_generation_prompt):
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt)
    assert ours == _reference(tokenizer, messages, add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", RICH_CONVERSATIONS)
def test_rich_template_matches_transformers(tokenizer, messages, add_generation_prompt):
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt, RICH_TEMPLATE)
    assert ours == _reference(tokenizer, messages, add_generation_prompt, RICH_TEMPLATE)


def test_jinja_constructs_match_transformers(tokenizer):
    messages = [{"role": "user", "content": "hé <x>"}]
    ours = tokenizer.apply_chat_template(messages, True, CONSTRUCTS_TEMPLATE)
    assert ours == _reference(tokenizer, messages, True, CONSTRUCTS_TEMPLATE)


def test_long_conversation_is_within_the_limits(tokenizer):
    """The size limit grows with the input, so a long conversation still renders, even
    with a template that accumulates it in a namespace (quadratic work)."""
    messages = [
        {"role": ("user", "assistant")[i % 2], "content": f"word {i} " * 2500} for i in range(60)
    ]
    accumulate = (
        "{% set ns = namespace(text='') %}{% for m in messages %}"
        "{% set ns.text = ns.text + m['role'] + ': ' + m['content'] + '\\n' %}"
        "{% endfor %}{{ ns.text }}"
    )
    for template in (None, accumulate):
        ours = tokenizer.apply_chat_template(messages, True, template)
        assert ours == _reference(tokenizer, messages, True, template)
        assert len(ours) > 1_000_000


def test_templates_render_in_the_immutable_sandbox():
    compiled = compile_template("{{ messages }}")
    assert isinstance(compiled.environment, ImmutableSandboxedEnvironment)


NESTED = "{% for i in range(10**5) %}{% for j in range(10**5) %}BODY{% endfor %}{% endfor %}"

HOSTILE = {
    # time
    "nested loops": (NESTED.replace("BODY", ""), "time limit"),
    "nested loops with output": (NESTED.replace("BODY", "{{ j }}"), "limit"),
    "nested loops with a product": (NESTED.replace("BODY", "{% set x = i * j %}"), "time limit"),
    "nested loops over strings": (
        "{% for c in 'x' * 100000 %}{% for d in 'y' * 100000 %}{% endfor %}{% endfor %}",
        "limit",
    ),
    "exponential macro": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
        "time limit",
    ),
    "recursive macro": (
        "{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}",
        "recursion limit",
    ),
    # size: refused before the value is made
    "string repeat": ("{{ 'a' * 10**10 }}", "size limit"),
    "list repeat": ("{{ messages * 10**8 }}", "size limit"),
    "huge power": ("{{ 2 ** (10**10) }}", "bits"),
    "huge product": ("{% set x = 2 ** 60000 %}{{ x * x * x }}", "bits"),
    "center filter": ("{{ 'a'|center(10**10) }}", "size limit"),
    "constant center width": ("{{ 'a'|center(10000000000) }}", "size limit"),
    "ljust method": ("{{ 'x'.ljust(10**10) }}", "size limit"),
    "format width": ("{{ '{:>10000000000}'.format(1) }}", "size limit"),
    "percent width": ("{{ '%10000000000d' % 1 }}", "size limit"),
    "expandtabs": ("{{ ('\t' * 1000).expandtabs(1000000) }}", "size limit"),
    "replace amplifies": ("{% set s = 'a' * 2000 %}{{ s.replace('', s) }}", "size limit"),
    "replace filter": ("{% set s = 'a' * 2000 %}{{ s|replace('', s) }}", "size limit"),
    "join separator": ("{{ range(100000)|map('string')|join('x' * 1000000) }}", "limit"),
    "lipsum": ("{{ lipsum(100000) }}", "size limit"),
    "tojson indent": ("{{ ([[1] * 1000] * 1000)|tojson(indent=1000) }}", "limit"),
    "namespace doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "size limit",
    ),
    "namespace list doubling": (
        "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}"
        "{% set ns.s = [ns.s, ns.s] %}{% endfor %}{{ ns.s|length }}",
        "limit",  # measuring a list that holds one list twice walks it twice: slow, bounded
    ),
    "concat chain": (
        "{% set s = 'a' * 1000000 %}{{ (s ~ s ~ s ~ s ~ s ~ s ~ s ~ s)|length }}",
        "size limit",
    ),
    "literal doubling": ("{% set a = [1] %}" + "{% set a = [a, a] %}" * 24, "limit"),
    # size: the output of a macro, block or the template
    "macro output": (
        "{% set s = 'a' * 1000000 %}{% macro f() %}{% for i in range(100000) %}{{ s }}"
        "{% endfor %}{% endmacro %}{{ f()|length }}",
        "size limit",
    ),
    # Jinja computes filters of constants while compiling, outside any render's limits
    "constant-folded filters": ("{{ 'a'|center(1000000) }}" * 300, "limit"),
    "format width from a string": ("{{ '{:>{}}'.format(1, '9999999999') }}", "size limit"),
    "set block output": (
        "{% set s = 'x' * 1000000 %}{% set t %}{% for i in range(100000) %}{{ s }}"
        "{% endfor %}{% endset %}{{ t|length }}",
        "limit",  # size or time, whichever comes first
    ),
    "printed list": (
        "{% set s = ['x' * 1000000] %}{% for i in range(100000) %}{{ s }}{% endfor %}",
        "limit",
    ),
}


@pytest.mark.parametrize("template, reason", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_template_fails_fast_without_big_memory(tokenizer, template, reason):
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match="chat template failed") as info:
            tokenizer.apply_chat_template(USER, chat_template=template)
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # on a slow or busy machine the time limit may come first; either way it is refused
    assert reason in str(info.value) or "time limit" in str(info.value)
    assert elapsed < 10, f"took {elapsed:.1f} s (the limit is {RENDER_SECONDS} s)"
    assert peak < 256 << 20, f"allocated {peak >> 20} MiB"


def test_renders_again_after_a_hostile_template(tokenizer):
    with pytest.raises(ValueError, match="time limit"):
        tokenizer.apply_chat_template(USER, chat_template=HOSTILE["nested loops"][0])
    assert tokenizer.apply_chat_template(USER) == _reference(tokenizer, USER, True)


def test_range_keeps_the_sandbox_cap_and_behaves_like_range(tokenizer):
    template = (
        "{{ range(5)|list }} {{ range(5)|length }} {{ range(1, 9, 2)[-1] }} {{ 3 in range(5) }}"
        " {{ range(3)|reverse|join(',') }} {{ range(4) }} {{ range(3)|last }}"
    )
    ours = tokenizer.apply_chat_template(USER, chat_template=template)
    assert ours == _reference(tokenizer, USER, True, template)
    with pytest.raises(ValueError, match="MAX_RANGE"):
        tokenizer.apply_chat_template(USER, chat_template="{{ range(100001)|length }}")
