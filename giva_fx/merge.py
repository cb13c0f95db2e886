"""Merge: fold every dW = diag(lambda_o) B diag(lambda_s) A into the ORIGINAL model object.

Merging into the user's own model keeps everything that hangs off it working (HF `generate()`,
`save_pretrained()`, timm helpers). The adapted model's base weights share storage with the
original, so after a merge its adapters are switched off (marked `merged`, vectors frozen): the
adapted model then returns the merged model's outputs instead of counting dW twice. `unmerge`
undoes both. `train=` parameters and updated buffers (batch-norm statistics) are copied back.
"""
from __future__ import annotations

import torch
from torch import nn

from giva_fx.errors import GivaError
from giva_fx.model import GivaModel
from giva_fx.trainable import VECTORS, full_parameters


def _target_weight(model: nn.Module, name: str, shape: torch.Size) -> nn.Parameter:
    try:
        weight = model.get_parameter(name)
    except AttributeError as exc:
        raise GivaError(f"merge: the model has no parameter {name!r}; pass the model that was adapted") from exc
    if weight.shape != shape:
        raise GivaError(f"merge: {name} has shape {tuple(weight.shape)} in the model but "
                        f"{tuple(shape)} in the adapted graph; pass the model that was adapted")
    return weight


def _fold(adapted: GivaModel, model: nn.Module, sign: int) -> None:
    gm = adapted.graph_module
    for name, adapter in adapted.adapters().items():
        if adapter.merged == (sign > 0):
            continue
        ours = gm.get_parameter(name)
        weight = _target_weight(model, name, ours.shape)
        delta = adapter.delta_for_weight().reshape(weight.shape)
        weight.data.copy_((weight.data.float() + sign * delta).to(weight.dtype))
        shared = weight.data_ptr() == ours.data_ptr()
        if shared:  # the adapted model sees the merged weight: its adapter must stay quiet
            adapter.merged = sign > 0
            for v in VECTORS:
                getattr(adapter, v).requires_grad_(sign < 0)


@torch.no_grad()
def merge(adapted: GivaModel, model: nn.Module) -> nn.Module:
    """Fold the adapters into `model` (the object that was adapted) and return it."""
    _fold(adapted, model, +1)
    for name, param in full_parameters(adapted).items():
        _target_weight(model, name, param.shape).data.copy_(param.data)
    own = dict(model.named_buffers())
    for name, buffer in adapted.graph_module.named_buffers():
        if name in own and own[name].shape == buffer.shape and not name.startswith("giva_adapters."):
            own[name].copy_(buffer)
    return model


@torch.no_grad()
def unmerge(adapted: GivaModel, model: nn.Module) -> nn.Module:
    """Subtract what `merge` folded in and switch the adapters back on."""
    _fold(adapted, model, -1)
    return model
