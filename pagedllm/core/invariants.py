"""Debug invariant mode: the bookkeeping re-checked after every engine step.

With ``PAGEDLLM_DEBUG_INVARIANTS=1`` in its environment the engine verifies the
invariants of DESIGN.md (free + referenced = total, ref counts equal holders, at
most one partly filled block per sequence, nothing held once nothing is alive)
after every step and abort, and stops at the first violation: a corrupt block
table would otherwise surface much later as another request's wrong tokens.
The checks cost O(blocks + tokens) per step, so they are off by default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEBUG_INVARIANTS_ENV = "PAGEDLLM_DEBUG_INVARIANTS"
_OFF = ("", "0", "false", "no", "off")


class InvariantError(AssertionError):
    """The engine's bookkeeping contradicts itself: a bug in pagedllm, never a user error.

    An AssertionError by kind, but raised explicitly so that ``python -O`` keeps
    the checks.
    """


def require(condition: bool, message: str) -> None:
    """Raise InvariantError with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvariantError(message)


def debug_invariants_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``PAGEDLLM_DEBUG_INVARIANTS`` asks for the checks (1/true/yes/on)."""
    env = os.environ if environ is None else environ
    return env.get(DEBUG_INVARIANTS_ENV, "").strip().lower() not in _OFF
