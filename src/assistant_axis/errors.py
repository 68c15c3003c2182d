"""One exception tree for everything the workflow reports to users."""

from __future__ import annotations

from pathlib import Path

__all__ = ["AxisError", "InputError", "JudgeError", "APIError"]


class AxisError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class InputError(AxisError):
    """A bad input file or value; the message names the file and the field."""

    def __init__(self, source: str | Path, field: str, problem: str):
        problem = " ".join(str(problem).split())  # one line, whatever a wrapped library error held
        self.source, self.field, self.problem = str(source), field, problem
        super().__init__(f"{source}: {field}: {problem}")


class JudgeError(AxisError):
    """The judge could not score (unreachable server, unusable model)."""


class APIError(AxisError):
    """Requests to an OpenAI-compatible server failed after their retries, or the server refused one."""
