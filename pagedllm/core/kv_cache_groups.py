"""Layers grouped by attention span: each group has its own block table per sequence.

A sliding-window layer needs only its window's keys, a full-attention layer every key,
so the two cannot share blocks: a sliding group drops the blocks its window has left
while the full group keeps them. Groups are of equal size (the fewest layers of any
span), so one block id means the same number of bytes in every group and all groups
draw from one pool, as vLLM's hybrid allocator does: layer slot s of a block holds the
KV of the s-th layer of whichever group owns the block. A model whose layers all share
one span (Llama; Mistral, whose every layer slides) has one group of every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers that attend over the same span, so can share one block table."""

    sliding_window: int | None  # None: full attention
    layers: tuple[int, ...]  # layer indices; layers[s] stores in slot s of the group's blocks


def group_layers(layer_windows: Sequence[int | None]) -> list[KVCacheGroup]:
    """Groups for layers with these windows (None: full attention), full attention first.

    Group 0 is a full-attention group whenever the model has one: a draft model and any
    other reader of "the" block table reaches every position through it.
    """
    by_window: dict[int | None, list[int]] = {}
    for layer, window in enumerate(layer_windows):
        by_window.setdefault(window, []).append(layer)
    if not by_window:
        raise ValueError("a model needs at least one layer")
    size = min(len(layers) for layers in by_window.values())
    groups = []
    for window in sorted(by_window, key=lambda w: (w is not None, w or 0)):
        layers = by_window[window]
        step = size if len(by_window) > 1 else len(layers)
        groups.extend(
            KVCacheGroup(window, tuple(layers[i : i + step])) for i in range(0, len(layers), step)
        )
    return groups


def group_size(groups: Sequence[KVCacheGroup]) -> int:
    """Layer slots in one block: the largest group's layer count."""
    return max(len(g.layers) for g in groups)
