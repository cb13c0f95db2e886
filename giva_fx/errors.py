"""Errors that name the stage that failed and what to do about it."""
from __future__ import annotations


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
