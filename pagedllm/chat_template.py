"""Chat templates, rendered in a sandbox bounded in time and memory.

A chat template comes from the model file (GGUF `tokenizer.chat_template` or
tokenizer_config.json), so it is untrusted code. It renders in the Jinja environment
that `transformers` builds for `apply_chat_template` (immutable sandbox, `trim_blocks`,
`lstrip_blocks`, `loopcontrols`, the `{% generation %}` tag, its `tojson`, and the
globals `raise_exception`, `strftime_now`, `dict` and `namespace`, with the same
variables), so a template renders byte for byte as `transformers` renders it. The
sandbox alone keeps a template from Python's internals but not from hanging the server
(`range(10**5)` loops nested) or exhausting its memory (`'a' * 10**10`), so this
environment adds limits, each raising `TemplateLimitError` (a ValueError):

* Time: rendering stops after `RENDER_SECONDS` of the thread's CPU time (or
  `RENDER_WALL_SECONDS` of wall-clock time). The deadline is checked on
  every loop iteration (`range` is lazy, and the compiler wraps every `{% for %}`),
  call, filter, operator, output value and output chunk.
* Size: no value and no output may exceed the render's size limit: `BASE_SIZE_LIMIT`
  plus `INPUT_SIZE_FACTOR` times the size of the input (messages and special tokens),
  so a long conversation still renders. Size counts the characters of strings plus one
  per object, through nested containers (a list holding a big string twice counts it
  twice, as printing it would). What multiplies its input (`*`, `**`, `%`, `~`,
  `replace`, `join`, `indent`, `format`, `tojson(indent)`, `lipsum`, ...) is refused
  before it runs, from its operands, and so is any integer argument of a call or filter
  above the limit (`center`, `ljust`, `zfill`, `truncate` widths); everything else
  (results of calls and filters, list and dict literals, namespace attributes, the
  output of macros and blocks) is checked as soon as it is made. One value may still
  take a small multiple of the limit in memory while it is made (`repr` of a list).
* Work: the values a render makes, all together, may not exceed `WORK_FACTOR` times
  the size limit, so a template cannot keep many big values alive at once (a template
  that accumulates the whole conversation message by message still fits).
* Integers: at most `MAX_INT_BITS` bits (`2 ** (10**10)` is refused, not computed).
* Recursion: a RecursionError (a macro calling itself) becomes a TemplateLimitError.

Before compiling, `check_template` refuses a template that names a private or dunder
attribute outright: the sandbox alone renders a single unsafe lookup such as
`{{ self._TemplateReference__context }}` as an empty string, which hides the attempt.
"""

from __future__ import annotations

import json
import re
import time
import types
from collections.abc import (
    Callable,
    Collection,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    Sequence,
    Sized,
    ValuesView,
)
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache, wraps
from itertools import repeat
from typing import Any, NamedTuple

import jinja2.ext
from jinja2 import Environment, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Namespace, generate_lorem_ipsum

# CPU time of the rendering thread (the largest allowed conversation, 4096 messages and
# 3.8 MB, takes 0.07 s), so renders competing for the GIL under load are not refused;
# wall-clock time is bounded too, more loosely.
RENDER_SECONDS = 0.5
RENDER_WALL_SECONDS = 5.0
BASE_SIZE_LIMIT = 1 << 20  # characters (or container items) one value or the output may hold
INPUT_SIZE_FACTOR = 4  # ... plus this many times the size of the input
WORK_FACTOR = 64  # everything made in one render: at most this many size limits
MAX_INT_BITS = 1 << 16  # no chat template needs bigger integers (str() refuses > 4300 digits)

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TemplateLimitError(ValueError):
    """A chat template ran past a time or size limit of the sandbox."""


# ----------------------------------------------------------------------------- budget


@dataclass
class _Budget:
    """The limits of one render, and what it has used of them."""

    limit: int
    deadline: float  # of the thread's CPU time
    wall_deadline: float
    produced: int = 0

    @classmethod
    def for_input(cls, input_size: int) -> _Budget:
        limit = BASE_SIZE_LIMIT + INPUT_SIZE_FACTOR * input_size
        return cls(
            limit, time.thread_time() + RENDER_SECONDS, time.monotonic() + RENDER_WALL_SECONDS
        )

    def tick(self) -> None:
        if time.thread_time() > self.deadline or time.monotonic() > self.wall_deadline:
            raise TemplateLimitError(f"rendering ran past the time limit of {RENDER_SECONDS} s")

    def refuse_over(self, size: int, what: str) -> None:
        if size > self.limit:
            raise TemplateLimitError(
                f"{what} would hold {size} characters or items, over the size limit of {self.limit}"
            )

    def charge(self, size: int) -> None:
        self.produced += size
        if self.produced > WORK_FACTOR * self.limit:
            raise TemplateLimitError(
                f"the template made over {WORK_FACTOR * self.limit} characters or items in all "
                f"(the work limit, {WORK_FACTOR} times the size limit)"
            )

    def check_ints(self, values: Iterable[Any]) -> None:
        """Refuse integer arguments above the limit: widths, counts and repeats of calls."""
        for value in values:
            if isinstance(value, int) and abs(value) > self.limit:
                raise TemplateLimitError(
                    f"an integer argument exceeds the size limit of {self.limit}"
                )

    def check_values(self, values: Iterable[Any], what: str) -> None:
        for value in values:
            self.refuse_over(_measure(value, self.limit).weight, what)

    def check_result(self, value: Any, what: str) -> None:
        """Refuse a value over the limit, and charge what it newly holds (its own length)."""
        if isinstance(value, Iterator):
            return  # lazy: each item is checked where it is made
        self.refuse_over(_measure(value, self.limit).weight, what)
        self.charge(len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 1)


# The budget of the render running in this thread (or task).
_ACTIVE: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    """The active render's budget. Outside a render Jinja is folding constants while it
    compiles (`'a'|center(10**6)` would be computed into the template's source, with no
    limit): refusing makes Jinja leave the expression to run under the render's limits."""
    budget = _ACTIVE.get()
    if budget is None:
        raise nodes.Impossible()
    return budget


# ----------------------------------------------------------------------------- sizes


class _Size(NamedTuple):
    chars: int  # characters of the strings inside
    items: int  # objects inside, containers and scalars alike
    depth: int  # nesting depth

    @property
    def weight(self) -> int:
        return self.chars + self.items


_SCALARS = frozenset({int, float, bool, type(None)})


def _parts(value: Any) -> tuple[int, Collection[Any]]:
    """Characters of `value` itself, and the values inside it."""
    kind = type(value)
    if kind in _SCALARS:  # the common types first: isinstance() of an ABC is slow
        return 0, ()
    if kind is str:
        return len(value), ()
    if kind is list or kind is tuple:
        return 0, value
    if isinstance(value, (str, bytes)):
        return len(value), ()
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")  # repr() prints them
    if isinstance(value, Mapping):
        return 0, [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return 0, value
    if isinstance(value, (KeysView, ValuesView, ItemsView)):
        return 0, list(value)
    if isinstance(value, (range, _GuardedRange)):
        return len(value), ()
    return 0, ()


def _measure(value: Any, stop: int) -> _Size:
    """The size of `value` through nested containers, counted only up to just past `stop`
    (so a list that holds the same big list a million times costs `stop` steps)."""
    budget = _ACTIVE.get()  # None: measuring the input, before the render starts
    chars = items = depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        items += 1
        if budget is not None and not items & 0xFFF:  # a million items take about a second
            budget.tick()
        if type(item) is str:  # the common case, inline: this loop is the hot path
            chars += len(item)
            continue
        own, children = _parts(item)
        chars, depth = chars + own, max(depth, level)
        if chars + items + len(children) > stop:
            return _Size(chars, items + len(children), depth)
        stack.extend(zip(children, repeat(level + 1)))
    return _Size(chars, items, depth)


def _weight(value: Any) -> int:
    return _measure(value, _budget().limit).weight


# -------------------------------------------------------------------- size estimates
# Each estimates the size of a result before it is computed, from the arguments; where an
# argument is a lazy iterator it is first made a list (in place) so that it can be measured.


def _arg(
    args: Sequence[Any], kwargs: Mapping[str, Any], index: int, name: str, default: Any
) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _as_list(args: list[Any], index: int) -> Any:
    if len(args) <= index:
        return None
    if isinstance(args[index], Iterable) and not isinstance(args[index], Sized):
        args[index] = list(args[index])  # a generator, as `|map` returns
    return args[index]


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _str_len(value: Any) -> int:
    """The length of a string, else the weight of `value`."""
    return len(value) if isinstance(value, (str, bytes)) else _weight(value)


def _join_size(items: Any, separator: Any) -> int:
    count = len(items) if isinstance(items, Sized) else 0
    return _weight(items) + count * _str_len(separator)


def _replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    hits = text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * len(new)


_BRACE_FIELD = re.compile(r"\{[^{}]*\}")
_PERCENT_FIELD = re.compile(r"%[#0 +\-]*(?:\d+|\*)?(?:\.(?:\d+|\*))?")
_DIGITS = re.compile(r"\d+")


def _format_size(fmt: Any, values: Iterable[Any], percent: bool) -> int:
    """Each field of `fmt` prints at most its widest width or precision plus its biggest
    argument (a `*` width comes from an integer argument)."""
    if not isinstance(fmt, str):
        return 0
    values = list(values.values()) if isinstance(values, Mapping) else list(values)
    fields = (_PERCENT_FIELD if percent else _BRACE_FIELD).findall(fmt)
    widths = [int(d) if len(d) < 19 else 10**18 for f in fields for d in _DIGITS.findall(f)]
    widths += [abs(v) for v in values if isinstance(v, int)]
    # a nested field (`{:>{}}`) takes its width from an argument, which may be a string
    widths += [int(v) for v in values if isinstance(v, str) and v.isdigit() and len(v) < 19]
    biggest = max((_weight(v) for v in values), default=0)
    return len(fmt) + len(fields) * (max(widths, default=0) + biggest)


def _percent_values(right: Any) -> Iterable[Any]:
    return right if isinstance(right, (tuple, Mapping)) else (right,)


def _tojson_size(args: list[Any], kwargs: dict[str, Any]) -> int:
    size = _measure(args[0], _budget().limit) if args else _Size(0, 0, 0)
    indent = _arg(args, kwargs, 2, "indent", None)
    separators = _arg(args, kwargs, 3, "separators", None)
    per_line = indent if isinstance(indent, int) else _str_len(indent or "")
    per_item = 2 + (_weight(separators) if separators else 2) + per_line * size.depth
    return size.chars + size.items * per_item


def _indent_size(args: list[Any], kwargs: dict[str, Any]) -> int:
    text, width = args[0], _arg(args, kwargs, 1, "width", 4)
    lines = text.count("\n") + 1 if isinstance(text, str) else _weight(text)
    return _str_len(text) + lines * (width if isinstance(width, int) else _str_len(width))


def _wordwrap_size(args: list[Any], kwargs: dict[str, Any]) -> int:
    text = _str_len(args[0])
    return text + (text + 1) * (1 + _str_len(_arg(args, kwargs, 3, "wrapstring", "") or ""))


def _urlize_size(args: list[Any], kwargs: dict[str, Any]) -> int:
    text = _str_len(args[0])
    extra = sum(
        _str_len(_arg(args, kwargs, i, n, "") or "") for i, n in ((3, "target"), (4, "rel"))
    )
    return 3 * text + (text // 2 + 1) * (64 + extra)  # every two characters could be a link


_FILTER_SIZES: dict[str, Callable[[list[Any], dict[str, Any]], int]] = {
    "join": lambda a, k: _join_size(_as_list(a, 0), _arg(a, k, 1, "d", "")),
    "replace": lambda a, k: _replace_size(
        a[0], _arg(a, k, 1, "old", ""), _arg(a, k, 2, "new", ""), _arg(a, k, 3, "count", None)
    ),
    "format": lambda a, k: _format_size(a[0], k or a[1:], percent=True),
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "urlize": _urlize_size,
    "tojson": _tojson_size,
}

_STR_METHOD_SIZES: dict[str, Callable[[str, list[Any], dict[str, Any]], int]] = {
    "join": lambda s, a, k: _join_size(_as_list(a, 0), s),
    "replace": lambda s, a, k: _replace_size(
        s, _arg(a, k, 0, "old", ""), _arg(a, k, 1, "new", ""), _arg(a, k, 2, "count", -1)
    ),
    "expandtabs": lambda s, a, k: len(s) + s.count("\t") * _int(_arg(a, k, 0, "tabsize", 8)),
    "translate": lambda s, a, k: len(s) * max(1, _weight(a[0]) if a else 1),
    "format": lambda s, a, k: _format_size(s, [*a, *k.values()], percent=False),
    "format_map": lambda s, a, k: _format_size(s, a[0] if a else {}, percent=False),
}


def _call_size(obj: Any, args: list[Any], kwargs: dict[str, Any]) -> int:
    """The estimated size of what a call makes, for the calls that multiply their input."""
    method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    subject = getattr(method, "__self__", None)
    if isinstance(subject, str) and isinstance(method, (types.BuiltinMethodType, types.MethodType)):
        estimate = _STR_METHOD_SIZES.get(method.__name__)
        return estimate(subject, args, kwargs) if estimate else 0
    if obj is generate_lorem_ipsum:
        count, longest = _arg(args, kwargs, 0, "n", 5), _arg(args, kwargs, 3, "max", 100)
        return (
            count * (longest * 16 + 16)
            if isinstance(count, int) and isinstance(longest, int)
            else 0
        )
    return 0


def _binop_size(operator: str, left: Any, right: Any) -> int:
    """The estimated size of `left <operator> right`; refuses integers that grow too big."""
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**" and ints and right > 0 and abs(left) > 1:
        _refuse_int_bits(left.bit_length() * right)
    elif operator == "*" and ints:
        _refuse_int_bits(left.bit_length() + right.bit_length())
    elif operator == "*" and isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
        return _str_len(left) * right
    elif operator == "*" and isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
        return _str_len(right) * left
    elif operator == "+" and isinstance(left, (str, bytes, list, tuple)):
        return _str_len(left) + _str_len(right)
    elif operator == "%" and isinstance(left, str):
        return _format_size(left, _percent_values(right), percent=True)
    return 0


def _refuse_int_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        raise TemplateLimitError(f"an integer would exceed {MAX_INT_BITS} bits")


# ----------------------------------------------------------------------------- globals


class _GuardedRange(Sequence[int]):
    """`range` as the sandbox gives it (at most 100000 items), iterated lazily against the deadline."""

    def __init__(self, rng: range) -> None:
        self._range = rng

    def __iter__(self) -> Iterator[int]:
        budget = _budget()
        for i in self._range:
            budget.tick()
            yield i

    def __reversed__(self) -> Iterator[int]:
        return iter(_GuardedRange(self._range[::-1]))

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        item = self._range[index]
        return _GuardedRange(item) if isinstance(item, range) else item

    def __contains__(self, value: object) -> bool:
        return value in self._range

    def __eq__(self, other: object) -> bool:
        return self._range == (other._range if isinstance(other, _GuardedRange) else other)

    def __hash__(self) -> int:
        return hash(self._range)

    def __repr__(self) -> str:
        return repr(self._range)

    @property
    def start(self) -> int:
        return self._range.start

    @property
    def stop(self) -> int:
        return self._range.stop

    @property
    def step(self) -> int:
        return self._range.step


def _range(*args: int) -> _GuardedRange:
    return _GuardedRange(safe_range(*args))


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: no HTML escaping, and its options exposed."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """transformers' `dict` global: the builtin's two uses, without its class to climb."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """transformers' `namespace` (no underscore names), and no value over the size limit:
    otherwise `{% set ns.s = ns.s ~ ns.s %}` in a loop doubles a string past any memory."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        budget = _budget()
        budget.tick()
        budget.refuse_over(_measure(value, budget.limit).weight, f"namespace attribute {name!r}")
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute."
            )


# ------------------------------------------------------------------------ environment


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` block, which marks what the
    assistant says (for training masks); rendering outputs its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's declared class attribute

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(
            lineno
        )

    def _generation_support(self, caller: Callable[[], str]) -> str:
        return caller()


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles templates so that every loop, `~` concatenation and list, tuple or dict
    literal passes through the environment's checks (Jinja has no hook for them)."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            guard = nodes.EnvironmentAttribute("guard_iter")
            loop.iter = nodes.Call(guard, [loop.iter], [], None, None).set_lineno(loop.lineno)
            loop.iter.set_environment(self.environment)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:  # as CodeGenerator.visit_Concat chooses
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.checked_concat({join}, (")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")

    def _checked_literal(
        self, visit: Callable[[Any, Frame], None], node: nodes.Expr, frame: Frame
    ) -> None:
        self.write("environment.checked_literal(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._checked_literal(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._checked_literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":  # not the targets of `for a, b in ...` or `set a, b = ...`
            self._checked_literal(super().visit_Tuple, node, frame)
        else:
            super().visit_Tuple(node, frame)


def _finalize(value: Any) -> Any:
    """Every `{{ value }}` passes here before it becomes text (a new string, unless it is one)."""
    budget = _budget()
    budget.tick()
    weight = _measure(value, budget.limit).weight
    budget.refuse_over(weight, "an output value")
    if not isinstance(value, str):
        budget.charge(weight)
    return value


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` checked against the deadline and the size limit before and after it runs."""
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # the context Jinja passes first
    estimate = _FILTER_SIZES.get(name)

    @wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        inputs = list(args[skip:])
        budget.check_ints([*inputs[1:], *kwargs.values()])  # the value itself may be any int
        budget.check_values([*inputs, *kwargs.values()], f"an argument of |{name}")
        if estimate is not None and inputs:
            budget.refuse_over(estimate(inputs, kwargs), f"the result of |{name}")
        result = func(*args[:skip], *inputs, **kwargs)
        budget.check_result(result, f"the result of |{name}")
        return result

    return guarded


class ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat template environment, with the time and size limits above."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
            finalize=_finalize,
        )
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.globals.update(
            range=_range,
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
        )

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Every call a template makes (macros, methods, globals), checked like a filter.
        (Dunder names, as in Jinja's own: a template may pass `self=` or `context=`.)"""
        budget = _budget()
        budget.tick()
        budget.check_ints([*args, *kwargs.values()])
        budget.check_values([*args, *kwargs.values()], "an argument of a call")
        arguments = list(args)
        budget.refuse_over(_call_size(__obj, arguments, kwargs), "the result of a call")
        result = super().call(__context, __obj, *arguments, **kwargs)
        budget.check_result(result, "the result of a call")
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        budget.refuse_over(_binop_size(operator, left, right), f"the result of {operator!r}")
        result = self.binop_table[operator](left, right)
        budget.check_result(result, f"the result of {operator!r}")
        return result

    def checked_concat(self, join: Callable[[Iterable[Any]], str], parts: tuple[Any, ...]) -> str:
        """`a ~ b ~ ...`, refused before joining when the parts add up past the limit."""
        budget = _budget()
        budget.tick()
        budget.refuse_over(
            sum(_measure(p, budget.limit).weight for p in parts), "the result of '~'"
        )
        result = join(parts)
        budget.check_result(result, "the result of '~'")
        return result

    def checked_literal(self, value: Any) -> Any:
        budget = _budget()
        budget.tick()
        budget.check_result(value, "a list, tuple or dict")
        return value

    def guard_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """The items of a `{% for %}` loop, checking the deadline before each."""
        budget = _budget()
        for item in iterable:
            budget.tick()
            yield item

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Joins the output of a macro, block or `{% set %}` block: counted part by part."""
        budget = _budget()
        pieces, size = [], 0
        for part in parts:
            size += len(part)
            budget.refuse_over(size, "the output of a macro or block")
            budget.tick()
            pieces.append(part)
        budget.charge(size)
        return "".join(pieces)


_ENVIRONMENT = ChatTemplateEnvironment()
_PARSER = Environment(extensions=[_GenerationTag, jinja2.ext.loopcontrols])


@lru_cache(maxsize=64)
def check_template(template: str) -> None:
    """Raise SecurityError if the template names a private attribute (`x._y`, `x['__y__']`,
    `x|attr('_y')`); syntax errors are left to the compiler, which reports them."""
    try:
        tree = _PARSER.parse(template)
    except Exception:
        return
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            name = node.arg.value if str(node.arg.value).startswith("__") else None
        elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
            name = node.args[0].value if isinstance(node.args[0], nodes.Const) else None
        else:
            name = None
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"the template reaches for the private attribute {name!r}")


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """The checked, compiled template (compiled once per template text)."""
    check_template(template)
    return _ENVIRONMENT.from_string(template)


# -------------------------------------------------------------------------- variables


def _plain(value: Any) -> Any:
    """Template data rebuilt from plain JSON types, as transformers rebuilds it: a rich
    object's methods are more than the sandbox knows to refuse."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """A message's reasoning under every name templates read it by, as transformers does."""
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def template_variables(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """What transformers' `apply_chat_template` passes a template: the conversation (keys
    whose value is None dropped), the tools (OpenAI's `tools` entries) or None, no
    documents, the flag, and the special tokens."""
    if not messages:
        raise ValueError("Cannot apply chat template to an empty conversation")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TypeError(f"chat messages should be dicts, but got {type(message).__name__}")
        chat.append(_alias_reasoning(_plain({k: v for k, v in message.items() if v is not None})))
    return {
        **_plain(dict(special_tokens)),
        "messages": chat,
        "tools": _plain(list(tools)) if tools else None,
        "documents": None,
        "add_generation_prompt": add_generation_prompt,
    }


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The tools offered in Hermes' words (the `<tool_call>` format the server's "hermes"
    parser reads), for chat templates that do not render tools themselves."""
    listed = "\n".join(json.dumps(tool) for tool in tools)
    return (
        "You are a function calling AI model. You may call one or more functions to assist "
        "with the user query. Here are the available tools:\n<tools>\n"
        f"{listed}\n</tools>\nFor each function call, return a JSON object with the function "
        "name and arguments within <tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


# ---------------------------------------------------------------------------- render


def render_template(template: str, variables: dict[str, Any]) -> str:
    """Render `template` with `variables` within the time and size limits (module docstring)."""
    compiled = compile_template(template)
    budget = _Budget.for_input(_measure(variables, 1 << 62).weight)
    token = _ACTIVE.set(budget)
    chunks = compiled.generate(**variables)
    try:
        return _collect(chunks, budget)
    except RecursionError as e:
        raise TemplateLimitError("calls nested too deeply (the recursion limit)") from e
    except MemoryError as e:
        raise TemplateLimitError("out of memory") from e
    finally:
        chunks.close()
        _ACTIVE.reset(token)


def _collect(chunks: Iterator[str], budget: _Budget) -> str:
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        budget.refuse_over(size, "the output")
        budget.charge(len(chunk))
        budget.tick()
        out.append(chunk)
    return "".join(out)
