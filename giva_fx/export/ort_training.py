"""`giva_fx.export.training_artifacts`: ONNX Runtime on-device training of the adapter vectors.

The adapted graph is exported once (settings in `_graph.EXPORTER`) and handed to
`onnxruntime.training.artifacts.generate_artifacts` with exactly `trainable_parameters(adapted)`
trainable and every other initializer frozen. The out_dir then holds::

    training_model.onnx   forward + loss + gradients of the trainable vectors
    eval_model.onnx       forward + loss
    optimizer_model.onnx  AdamW (torch.optim.AdamW's update rule) or SGD over the trainable vectors
    checkpoint            every initializer, by canonical name (`<weight>.lambda_o`, `<weight>`, ...)
    giva_fx.json          how a batch maps onto the graph inputs, the loss, the trainable names

and is verified before it appears: each vector is its own initializer, the trainable set is exactly
those vectors, all four artifacts load in ONNX Runtime, and a training step runs on the sample.
Before export, what ORT's training graph mishandles is rewritten (`_graph.for_training`: frozen
batch norm as arithmetic, HardSwish as clamps) and static shapes are inferred through the adapters
(ORT's pooling gradients read them).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giva_fx.batches import Batch, as_batch
from giva_fx.errors import ConfigError, ExportError
from giva_fx.files import atomic_dir
from giva_fx.export._graph import (EXPORTER, MAX_IR_VERSION, FlatModel, Slot, check_vectors, eval_graph,
                                   export_onnx, flat_logits_output, for_training, input_slots, loss_output,
                                   require)
from giva_fx.loss import logits_of
from giva_fx.model import GivaModel
from giva_fx.trainable import trainable_parameters

LOSSES = ("cross_entropy", "mse", "model")
OPTIMIZERS = ("adamw", "sgd")
TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT, INFO = (
    "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "giva_fx.json")
_GRAD_SUFFIX = "_grad.accumulation.out"  # onnxblock's name for the accumulated gradient of a parameter


@dataclass(frozen=True)
class ArtifactsInfo:
    """What a trainer needs beyond the ONNX files: how a batch feeds the graph, and what trains."""

    inputs: tuple[Slot, ...]
    target: Slot | None  # the loss target of a built-in loss: (inputs, target)'s target or `labels`
    loss: str
    trainable: dict[str, tuple[int, ...]]
    optimizer: dict[str, Any]
    exporter: dict[str, Any]

    def feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        """The graph inputs for `batch`, by name; a missing input or target is an `ExportError`."""
        feeds = {slot.name: _array(slot.take(batch), slot.dtype) for slot in self.inputs}
        if self.target is not None:
            target = batch.target if batch.target is not None else batch.kwargs.get("labels")
            if not isinstance(target, torch.Tensor):
                raise ExportError(f"loss={self.loss!r} needs a target: pass (inputs, target) batches or a "
                                  "`labels` entry in dict batches")
            if self.loss == "cross_entropy":  # the graph's logits are (N, classes)
                target = target.reshape(-1)
            feeds[self.target.name] = _array(target, self.target.dtype)
        return feeds

    def to_json(self) -> str:
        return json.dumps({"format": "giva-fx ort-training", "version": 1, **asdict(self)}, indent=1)

    @classmethod
    def read(cls, out_dir: str | os.PathLike) -> ArtifactsInfo:
        path = Path(out_dir) / INFO
        try:
            raw = json.loads(path.read_text())
            return cls(inputs=tuple(Slot(**s) for s in raw["inputs"]),
                       target=Slot(**raw["target"]) if raw["target"] else None, loss=raw["loss"],
                       trainable={k: tuple(v) for k, v in raw["trainable"].items()},
                       optimizer=raw["optimizer"], exporter=raw["exporter"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{path} is missing or malformed ({exc}); pass a directory written by "
                              "giva_fx.export.training_artifacts") from exc


def training_artifacts(
    adapted: GivaModel,
    sample: Any,
    out_dir: str | os.PathLike,
    *,
    loss: str = "cross_entropy",
    optimizer: str = "adamw",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    overwrite: bool = False,
) -> Path:
    """Write ONNX Runtime training artifacts for the adapter vectors of `adapted` to `out_dir`.

    `out_dir` appears only once complete and verified; an existing one is replaced only with
    `overwrite=True`, and only on success. The graph is exported in eval form (no dropout, batch norm
    on running statistics), with dynamic batch (and sequence) axes.

    Args:
        adapted: the model `giva_fx.adapt` returned; it is not modified.
        sample: one batch in any form `adapt` takes; it fixes the graph inputs.
        out_dir: the artifact directory.
        loss: "cross_entropy" (logits over their last dim vs integer targets, as `giva_fx.loss`
            does), "mse" (logits vs float targets), or "model" (the model's own loss output, e.g. an
            HF model given `labels`; the one for causal LMs, whose loss shifts the labels).
            Built-in losses take the target from `(inputs, target)` batches or a `labels` entry
            of dict batches.
        optimizer: "adamw" (torch.optim.AdamW's update rule) or "sgd" (plain, no momentum or decay).
        betas, eps, weight_decay: AdamW settings; the defaults are torch.optim.AdamW's (onnxblock's
            own defaults differ: eps 1e-6, weight_decay 0).
        overwrite: replace an existing `out_dir`.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose from {list(LOSSES)}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose from {list(OPTIMIZERS)}")
    require("onnxruntime.training.artifacts")  # before any work
    batch = as_batch(sample)
    trainable = {n: tuple(p.shape) for n, p in trainable_parameters(adapted).items()}
    if not trainable:
        raise ExportError("the adapted model has nothing to train (no adapter and no train= parameter)")
    if loss == "model":
        slots, target = input_slots(batch), None
        outputs, names = (loss_output, logits_of), ("loss", "logits")
    else:
        slots = input_slots(batch, skip=("labels",))
        target = Slot("labels", "target", "int64") if loss == "cross_entropy" else Slot("target", "target", "float32")
        outputs, names = ((flat_logits_output if loss == "cross_entropy" else logits_of),), ("logits",)
    info = ArtifactsInfo(slots, target, loss, trainable,
                         {"name": optimizer, **({"betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                                                 "rule": "torch.optim.AdamW"} if optimizer == "adamw" else {})},
                         {"exporter": "torch.onnx TorchScript", "opset": EXPORTER["opset_version"],
                          "max_ir_version": MAX_IR_VERSION})
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:  # refuses an existing out_dir before any work
        gm = eval_graph(adapted, batch, merged=False)
        for_training(gm)
        model = export_onnx(FlatModel(gm, batch, slots, outputs), adapted, batch, slots, names)
        check_vectors(model, trainable)
        # static shapes through the adapters' shape arithmetic: ORT's pooling gradients read them
        model = require("onnx").shape_inference.infer_shapes(model, data_prop=True)
        frozen = [i.name for i in model.graph.initializer if i.name not in trainable]
        _generate(model, trainable, frozen, loss, optimizer, betas, eps, weight_decay, tmp)
        _pin_versions(tmp, adamw=optimizer == "adamw")
        (tmp / INFO).write_text(info.to_json())
        verify(tmp, info, batch)
    return Path(out_dir)


def _generate(model: Any, trainable: dict[str, tuple[int, ...]], frozen: list[str], loss: str, optimizer: str,
              betas: tuple[float, float], eps: float, weight_decay: float, out: Path) -> None:
    artifacts = require("onnxruntime.training.artifacts")
    onnxblock = require("onnxruntime.training.onnxblock")
    loss_block = {"cross_entropy": artifacts.LossType.CrossEntropyLoss, "mse": artifacts.LossType.MSELoss,
                  "model": None}[loss]
    optim_block = (onnxblock.optim.AdamW(betas=tuple(betas), eps=eps, weight_decay=weight_decay)
                   if optimizer == "adamw" else artifacts.OptimType.SGD)
    with native_output_to_error("onnxruntime could not build the training graph"):
        artifacts.generate_artifacts(model, requires_grad=list(trainable), frozen_params=frozen, loss=loss_block,
                                     optimizer=optim_block, artifact_directory=out,
                                     additional_output_names=["logits"] if loss_block is not None else None)


def _pin_versions(out: Path, *, adamw: bool) -> None:
    """Stamp IR <= 10 on every model (newer onnx releases stamp versions ORT 1.19 refuses) and give AdamW
    torch's update rule (adam_mode 0: decay before the step, bias correction on both moments; onnxblock
    emits mode 1, the Hugging Face rule, which places eps differently)."""
    onnx_lib = require("onnx")
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL):
        model = onnx_lib.load(out / name)
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        if name == OPTIMIZER_MODEL and adamw:
            (node,) = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
            (mode,) = [a for a in node.attribute if a.name == "adam_mode"]
            mode.i = 0
        onnx_lib.save(model, out / name)


def verify(out_dir: str | os.PathLike, info: ArtifactsInfo, sample: Batch | None = None) -> None:
    """The training model computes gradients for exactly the trainable vectors, all four artifacts
    load, and (when `sample` holds what the loss needs) a training and an eval step run on it."""
    onnx_lib, api = require("onnx"), require("onnxruntime.training.api")
    out, trainable = Path(out_dir), info.trainable
    graph = onnx_lib.load(out / TRAINING_MODEL, load_external_data=False).graph
    grads = {o.name.removesuffix(_GRAD_SUFFIX) for o in graph.output if o.name.endswith(_GRAD_SUFFIX)}
    if grads != set(trainable):
        raise ExportError(f"the training graph trains {sorted(grads - set(trainable))[:5]} it should not and "
                          f"not {sorted(set(trainable) - grads)[:5]} it should")
    with native_output_to_error("onnxruntime could not load the training artifacts"):
        state = api.CheckpointState.load_checkpoint(out / CHECKPOINT)
        module = api.Module(out / TRAINING_MODEL, state, out / EVAL_MODEL)
        api.Optimizer(out / OPTIMIZER_MODEL, module)
    expected = sum(_numel(s) for s in trainable.values())
    if module.get_parameters_size(trainable_only=True) != expected:
        raise ExportError(f"the checkpoint holds {module.get_parameters_size(trainable_only=True)} trainable "
                          f"values, the adapter vectors {expected}")
    try:
        feeds = info.feeds(sample) if sample is not None else None
    except ExportError:
        feeds = None  # no target in the sample: nothing to run
    if feeds is not None:
        with native_output_to_error("the training graph does not run on the sample batch"):
            for training in (True, False):
                inputs = [feeds[n] for n in module.train(training).input_names()]
                loss = np.asarray(module(*inputs)[0])
                if not np.isfinite(loss).all():
                    raise ExportError(f"the {'training' if training else 'eval'} graph gives a loss of {loss}")


def _array(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy().astype(dtype, copy=False))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@contextlib.contextmanager
def native_output_to_error(what: str) -> Iterator[None]:
    """Keep onnxruntime's native log lines (it logs graph passes at info level, whatever the
    configured severity) off the console; on failure, put their tail into the raised error."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        except Exception as exc:
            log.seek(0)
            lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
            detail = "\n  ".join([ln for ln in lines if "[E:" in ln][-3:])
            raise ExportError(f"{what}: {exc}" + (f"\n  {detail}" if detail else "")) from exc
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
