"""What an embedding request asks for: how the prompt's hidden states become one vector."""

from __future__ import annotations

from dataclasses import dataclass

# last: the final token's state (causal LMs: the only one that has seen the whole input);
# mean: the average over every prompt position; cls: the first position's.
POOLING_TYPES = ("last", "mean", "cls")


@dataclass(frozen=True)
class PoolingParams:
    """`pooling` None: the engine's `--pooling` (from the model's metadata where it says).
    `normalize` scales the vector to unit length, as embedding APIs return it."""

    pooling: str | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {POOLING_TYPES}, got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a boolean, got {self.normalize!r}")
