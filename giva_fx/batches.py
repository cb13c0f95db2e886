"""Normalise what users pass as sample data into a list of `Batch` records.

Accepted forms, one batch each: a tensor (the model's single input); a dict of tensors (keyword
inputs, as HF models take; labels inside it make the model compute its own loss); a tuple
``(inputs, target)`` where ``inputs`` is a tensor, tuple or dict. Many batches: a list, or any
iterable such as a DataLoader, whose items are of those forms (lists from a DataLoader's
default collate count as ``(inputs, target)``).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from giva_fx.errors import BatchError


@dataclass(frozen=True)
class Batch:
    """One call of the model: positional args, keyword args, and an optional loss target."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: torch.Tensor | None = None
    raw: Any = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the batch feeds to the model (not the target)."""
        return [v for v in (*self.args, *self.kwargs.values()) if isinstance(v, torch.Tensor)]


def _inputs(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise BatchError(
        f"batch inputs of type {type(inputs).__name__} are not supported; pass a tensor, a dict "
        "of tensors, or a tuple (inputs, target)"
    )


def as_batch(item: Any) -> Batch:
    """Turn one user batch into a `Batch`."""
    if isinstance(item, torch.Tensor):
        return Batch((item,), {}, None, item)
    if isinstance(item, Mapping):
        return Batch((), dict(item), None, item)
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            args, kwargs = _inputs(item[0])
            return Batch(args, kwargs, None, item)
        if len(item) == 2:
            target = item[1]
            if target is not None and not isinstance(target, torch.Tensor):
                raise BatchError(
                    f"the target of an (inputs, target) batch must be a tensor, got "
                    f"{type(target).__name__}"
                )
            args, kwargs = _inputs(item[0])
            return Batch(args, kwargs, target, item)
        raise BatchError(
            f"a tuple batch must be (inputs,) or (inputs, target), got {len(item)} items; wrap "
            "several positional inputs as ((x1, x2), target)"
        )
    raise BatchError(
        f"a batch of type {type(item).__name__} is not supported; pass a tensor, a dict of "
        "tensors, a tuple (inputs, target), or a list/DataLoader of those"
    )


def as_batches(batches: Any) -> list[Batch]:
    """One batch, or a list / iterable of batches, as a non-empty list of `Batch`."""
    if isinstance(batches, (torch.Tensor, Mapping, tuple)):
        return [as_batch(batches)]
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise BatchError(
            f"sample batches of type {type(batches).__name__} are not supported; pass a tensor, "
            "a dict of tensors, a tuple (inputs, target), or a list/DataLoader of those"
        )
    out = [as_batch(item) for item in batches]
    if not out:
        raise BatchError("the list of sample batches is empty; pass at least one batch")
    return out
