"""User-facing errors: one line, naming the field and the fix, with an exit code.

The CLI prints ``error: <message>`` and exits with ``exit_code``; no traceback.
Exit codes: 2 = bad input (malformed config, impossible strategy), 3 = does not fit.
"""

from __future__ import annotations


class AutoparError(Exception):
    """Base class of errors shown to users as one line."""

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InputError(AutoparError):
    """Malformed input: a config file, a model name, a strategy, a cluster."""

    exit_code = 2


class DoesNotFitError(AutoparError):
    """A plan or strategy that cannot fit in device memory."""

    exit_code = 3


def first_error(exc) -> str:
    """The first error of a pydantic ``ValidationError`` as ``field 'a.b': message`` (without pydantic's
    "Value error, " prefix; the bare message when a whole-model validator raised it, which has no field)."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"field '{loc}': {msg}" if loc else msg
