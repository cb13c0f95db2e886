"""Errors that name the stage that failed and what to do about it; warnings that point at the
user's call."""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


class GivaError(Exception):
    """Base class: every error giva-fx raises on purpose is one of these."""


class BatchError(GivaError, ValueError):
    """The sample batch cannot be used (wrong type, empty, no target for the loss)."""


class CaptureError(GivaError):
    """The model could not be captured into an fx graph."""


class MatchError(GivaError):
    """No op could be selected for adaptation."""


class LossError(GivaError, ValueError):
    """No usable scalar loss could be computed from the model output."""


class ConfigError(GivaError, ValueError):
    """An option of adapt() is out of its range."""


class AdapterFileError(GivaError):
    """An adapter file is unreadable, malformed, or does not fit the model."""


class ExportError(GivaError):
    """An ONNX export or ONNX Runtime training artifact could not be written, verified or read back."""


class GivaWarning(UserWarning):
    """A warning giva-fx issues on purpose (a rank clamped, a fallback to random bases, ...): one
    category to silence, record or escalate them all."""


# Warnings held for the caller of a public function, one list per call in progress, innermost
# last. Module-global, not thread-local: profiling hooks may run on autograd's device threads (so
# two threads adapting at once may report each other's warnings: at the wrong line, never lost).
_held: list[list[GivaWarning]] = []


def warn(message: str, *, stacklevel: int = 1) -> None:
    """Issue a `GivaWarning` `stacklevel` frames above the caller (as `warnings.warn` counts), or,
    while a `warns_at_caller` function runs, hold it for that function's caller."""
    if _held:
        _held[-1].append(GivaWarning(message))
    else:
        warnings.warn(message, GivaWarning, stacklevel=stacklevel + 1)


def warns_at_caller(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Make the `GivaWarning`s issued while `fn` runs point at the line that called it.

    Deep in a pipeline (in a backward hook, say) no stacklevel reaches the user's code, so they are
    held and issued once `fn` returns or raises, where the user's filters apply as usual: one made
    an error raises then (or, if `fn` failed anyway, becomes a note on that failure). Warnings
    from other code (the user's model, torch) are not touched."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        held: list[GivaWarning] = []
        _held.append(held)
        try:
            result = fn(*args, **kwargs)
        except BaseException as failure:
            _issue(held, failure)
            raise
        _issue(held, None)
        return result

    return wrapper


def _issue(held: list[GivaWarning], failure: BaseException | None) -> None:
    """Close `held`'s scope and issue its warnings at the caller's caller, or hand them to an
    enclosing `warns_at_caller` call, which issues them at its own caller."""
    del _held[next(i for i, h in enumerate(_held) if h is held)]  # by identity: empty lists are equal
    if _held:
        _held[-1].extend(held)
        return
    for w in held:
        try:
            warnings.warn(w, stacklevel=3)
        except Warning as escalated:  # a filter made it an error
            if failure is None:
                raise
            failure.add_note(f"{type(escalated).__name__}: {escalated}")  # the failure stays the error
