"""User-facing errors.

Every problem a user can cause (a bad file, a bad pipeline, bad data) is raised as a
:class:`GraphSurgeonError`. The CLI prints it as one line and exits with code 2; anything else
is a bug in graphsurgeon and keeps its traceback.
"""

from __future__ import annotations

import os


class GraphSurgeonError(Exception):
    """A problem with the user's input, printed as ``<where>: <problem>``."""

    exit_code = 2

    def __init__(self, problem: str, *, where: str | os.PathLike | None = None) -> None:
        self.problem = " ".join(str(problem).split())  # always one line
        self.where = None if where is None else os.fspath(where)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}" if self.where else self.problem


class ModelError(GraphSurgeonError):
    """The model file is missing, unreadable, invalid or unsafe."""


class PipelineError(GraphSurgeonError):
    """The pipeline spec is invalid; ``where`` names the file and the step."""


class DataError(GraphSurgeonError):
    """A calibration/eval ``.npz`` file does not fit the model."""


class VerificationError(GraphSurgeonError):
    """A pass broke the model: a structural check failed or an exact pass changed outputs."""

    exit_code = 3
