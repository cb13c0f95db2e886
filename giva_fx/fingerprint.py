"""Fingerprints of weights: shape, dtype and a SHA-256 of the bytes, per qualified name.

An adapter file carries the fingerprint of the weights it adapts, so loading it onto another
model (other weights, another dtype, another architecture) is noticed, and the refusal can say
exactly which weights differ and how.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TypedDict

import torch
from torch import nn


class WeightPrint(TypedDict):
    shape: list[int]
    dtype: str  # "float32", "bfloat16", ...
    sha256: str


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in row-major order (any dtype, any device)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def fingerprint(module: nn.Module, names: Iterable[str] | None = None) -> dict[str, WeightPrint]:
    """Shape, dtype and SHA-256 of each named parameter of `module` (default: all of them).

    Names that `module` does not have are left out of the result, so comparing two fingerprints
    (`differences`) reports them as missing.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    wanted = params if names is None else [n for n in names if n in params]
    return {n: {"shape": list(params[n].shape), "dtype": dtype_name(params[n].dtype),
                "sha256": tensor_digest(params[n])} for n in wanted}


def differences(saved: Mapping[str, WeightPrint], current: Mapping[str, WeightPrint]) -> dict[str, str]:
    """Weight name -> how `current` differs from `saved`, for every weight of `saved` that does."""
    found: dict[str, str] = {}
    for name, was in saved.items():
        now = current.get(name)
        if now is None:
            found[name] = "not in the model"
        elif list(now["shape"]) != list(was["shape"]):
            found[name] = f"shape {tuple(was['shape'])} in the file, {tuple(now['shape'])} in the model"
        elif now["dtype"] != was["dtype"]:
            found[name] = f"dtype {was['dtype']} in the file, {now['dtype']} in the model"
        elif now["sha256"] != was["sha256"]:
            found[name] = "different values (same shape and dtype)"
    return found
