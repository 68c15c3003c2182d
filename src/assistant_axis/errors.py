"""One exception tree for everything the workflow reports to users."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["AxisError", "InputError", "ArgumentError", "renamed", "JudgeError", "APIError"]


class AxisError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class InputError(AxisError):
    """A bad input file or value; the message names the file and the field."""

    def __init__(self, source: str | Path, field: str, problem: str):
        problem = " ".join(str(problem).split())  # one line, whatever a wrapped library error held
        self.source, self.field, self.problem = str(source), field, problem
        super().__init__(f"{source}: {field}: {problem}")


class ArgumentError(InputError):
    """A library function was given a bad argument. It names the function and its own argument
    (`load_model: dtype: unknown dtype 'fp8'`), whoever called it; a caller that took the value from
    somewhere else reports it under that name instead (see `renamed`)."""

    def __init__(self, function: str, argument: str, problem: str):
        super().__init__(function, argument, problem)


@contextmanager
def renamed(source: str, names: dict[str, str]) -> Iterator[None]:
    """Report an `ArgumentError` as coming from `source` under the caller's name for the argument: the
    workflow names the config key that set it, the CLI its flag. `names` maps `function.argument` (or a
    settings argument, whose `function.settings.key` keeps its `.key`) to that name:

    >>> with renamed("config", {"load_model.dtype": "model.dtype"}):
    ...     load_model(path, dtype)
    """
    try:
        yield
    except ArgumentError as exc:
        where = f"{exc.source}.{exc.field}"
        for argument, name in names.items():
            if where == argument or where.startswith(argument + "."):
                raise InputError(source, name + where[len(argument) :], exc.problem) from exc
        raise


class JudgeError(AxisError):
    """The judge could not score (unreachable server, unusable model)."""


class APIError(AxisError):
    """Requests to an OpenAI-compatible server failed after their retries, or the server refused one."""
