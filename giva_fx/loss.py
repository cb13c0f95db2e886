"""The training loss of a batch: the model's own, the user's `loss_fn`, or cross-entropy."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from giva_fx.batches import Batch
from giva_fx.errors import LossError

LossFn = Callable[[Any, Any], torch.Tensor]


def own_loss(output: Any) -> torch.Tensor | None:
    """`output.loss` / `output["loss"]` when the model computed one (HF models given labels)."""
    if isinstance(output, Mapping):
        return output.get("loss")
    return getattr(output, "loss", None) if not isinstance(output, torch.Tensor) else None


def logits_of(output: Any) -> torch.Tensor:
    """The prediction tensor of an output: the tensor itself, `.logits`, or its first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LossError(f"cannot find logits in a model output of type {type(output).__name__}; pass loss_fn=")


def batch_loss(output: Any, batch: Batch, loss_fn: LossFn | None) -> torch.Tensor:
    """A finite scalar loss for `batch`, or a `LossError` saying how to supply one."""
    if loss_fn is not None:
        loss = loss_fn(output, batch.raw)
    elif (loss := own_loss(output)) is not None:
        pass
    elif batch.target is not None:
        if batch.target.is_floating_point() or batch.target.is_complex():
            raise LossError(
                f"the batch target has dtype {batch.target.dtype}; the default loss is "
                "cross-entropy over integer class targets: pass loss_fn=(output, batch) -> loss"
            )
        logits = logits_of(output)
        try:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch.target.reshape(-1))
        except (RuntimeError, ValueError, IndexError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LossError(
                f"the default cross-entropy loss failed ({first}): it needs one integer class in "
                f"[0, {logits.shape[-1]}) per prediction (logits {tuple(logits.shape)}, target "
                f"{tuple(batch.target.shape)}); fix the targets or pass loss_fn="
            ) from exc
    else:
        raise LossError(
            "cannot derive a loss: the batch has no target and the model returned no loss; pass "
            "batches as (inputs, target), include labels in a dict batch, or pass loss_fn="
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise LossError(f"the loss must be a scalar tensor, got {shape}; reduce it (e.g. .mean())")
    if not torch.isfinite(loss.detach()).all():
        raise LossError(f"the loss is not finite ({loss.item()}); check the inputs and the model's weights")
    return loss.reshape(())
