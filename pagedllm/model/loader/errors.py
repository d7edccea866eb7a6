"""The one error every loader raises for bad model input."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(ValueError):
    """A model file or folder that cannot be loaded; the message names the path and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
