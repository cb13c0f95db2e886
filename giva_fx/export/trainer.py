"""`OrtTrainer`: train the adapter vectors with ONNX Runtime from `training_artifacts`, and
`load_ort_checkpoint`: put the vectors trained there back into the PyTorch adapted model.

    trainer = OrtTrainer("artifacts", lr=1e-3, warmup_steps=10, total_steps=500)
    for batch in batches:
        loss = trainer.step(batch)
    trainer.save("trained.ckpt")
    load_ort_checkpoint(adapted, "trained.ckpt")   # then giva_fx.merge(adapted, model) as usual

Checkpoints are ONNX Runtime's flatbuffer files: reading one runs no pickle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giva_fx.batches import Batch, as_batch
from giva_fx.errors import ConfigError, ExportError
from giva_fx.files import atomic_file
from giva_fx.export._graph import MAX_IR_VERSION, require
from giva_fx.export.ort_training import (CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, ArtifactsInfo,
                                         native_output_to_error)
from giva_fx.model import GivaModel
from giva_fx.trainable import trainable_parameters

_STEPS = "giva_fx.steps"  # checkpoint property: optimizer steps taken, for the schedule on resume


@dataclass(frozen=True)
class Evaluation:
    """The eval model's loss and logits for one batch."""

    loss: float
    logits: np.ndarray


class OrtTrainer:
    """ONNX Runtime training (CheckpointState / Module / Optimizer) of a `training_artifacts` directory.

    Args:
        out_dir: the directory `giva_fx.export.training_artifacts` wrote.
        lr: the learning rate (the peak one when a schedule is set).
        warmup_steps, total_steps: with `total_steps`, the rate rises linearly from 0 to `lr` over
            `warmup_steps` steps, then falls linearly to 0 at `total_steps` (the rule of ORT's
            LinearLRScheduler and of transformers' linear schedule; set per step here, because
            onnxruntime-training 1.19.2's Python LinearLRScheduler swaps its two step counts).
        checkpoint: start from this checkpoint (one `save` wrote) instead of `out_dir`'s initial one.
        device: ONNX Runtime device, e.g. "cpu" or "cuda".
        threads: ONNX Runtime's intra-op threads (default: its own choice, one per physical core).
    """

    def __init__(self, out_dir: str | os.PathLike, *, lr: float = 1e-3, warmup_steps: int = 0,
                 total_steps: int | None = None, checkpoint: str | os.PathLike | None = None,
                 device: str = "cpu", threads: int | None = None) -> None:
        if total_steps is None and warmup_steps:
            raise ConfigError("warmup_steps needs total_steps (the step at which the rate reaches 0)")
        if total_steps is not None and not 0 <= warmup_steps < total_steps:
            raise ConfigError(f"need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}")
        api, ort = require("onnxruntime.training.api"), require("onnxruntime")
        self.out_dir = Path(out_dir)
        self.info = ArtifactsInfo.read(self.out_dir)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        with native_output_to_error(f"onnxruntime could not load the artifacts in {self.out_dir}"):
            self.state = api.CheckpointState.load_checkpoint(Path(checkpoint or self.out_dir / CHECKPOINT))
            self.module = api.Module(self.out_dir / TRAINING_MODEL, self.state, self.out_dir / EVAL_MODEL,
                                     device=device, session_options=options)
            self.optimizer = api.Optimizer(self.out_dir / OPTIMIZER_MODEL, self.module)
        self.base_lr, self.warmup_steps, self.total_steps = lr, warmup_steps, total_steps
        props = self.state.properties
        self.steps = int(props[_STEPS]) if _STEPS in props else 0  # resumed runs continue their schedule

    @property
    def lr(self) -> float:
        """The learning rate the next step uses: `base_lr`, scaled by the schedule if one is set."""
        if self.total_steps is None:
            return self.base_lr
        step, warmup, total = self.steps, self.warmup_steps, self.total_steps
        factor = step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup))
        return self.base_lr * factor

    @lr.setter
    def lr(self, value: float) -> None:
        self.base_lr = value

    def step(self, batch: Any) -> float:
        """One optimizer step on `batch` (any form `adapt` takes); returns the loss before the step."""
        self.module.train()
        loss = self._run(as_batch(batch))[0]
        self.optimizer.set_learning_rate(self.lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        self.steps += 1
        return float(loss)

    def evaluate(self, batch: Any) -> Evaluation:
        """Loss and logits of the eval model on `batch`, with the current vectors."""
        self.module.eval()
        loss, logits = self._run(as_batch(batch))[:2]
        return Evaluation(float(loss), logits)

    def gradients(self, batch: Any) -> dict[str, np.ndarray]:
        """The loss gradient of every trainable vector on `batch`, without a step (e.g. to check that
        gradients reach every adapter)."""
        self.module.train()
        self.module.lazy_reset_grad()
        self._run(as_batch(batch))
        grads = {name: np.array(self.state.parameters[name].grad) for name in self.info.trainable}
        self.module.lazy_reset_grad()
        return grads

    def save(self, path: str | os.PathLike) -> Path:
        """Write the current state (vectors, frozen weights, optimizer moments, step count) as a
        checkpoint file; `OrtTrainer(out_dir, checkpoint=path)` resumes from it."""
        api = require("onnxruntime.training.api")
        self.state.properties[_STEPS] = self.steps
        with atomic_file(path) as tmp:
            api.CheckpointState.save_checkpoint(self.state, tmp, include_optimizer_state=True)
        return Path(path)

    def export_inference(self, path: str | os.PathLike) -> Path:
        """Write an inference ONNX model (inputs -> logits) with the trained vectors."""
        onnx_lib = require("onnx")
        with atomic_file(path) as tmp:
            self.module.export_model_for_inferencing(tmp, ["logits"])
            model = onnx_lib.load(tmp)
            model.ir_version = min(model.ir_version, MAX_IR_VERSION)
            onnx_lib.save(model, tmp)
        return Path(path)

    def _run(self, batch: Batch) -> tuple[np.ndarray, ...]:
        feeds = self.info.feeds(batch)
        return self.module(*[feeds[n] for n in self.module.input_names()])


@torch.no_grad()
def load_ort_checkpoint(adapted: GivaModel, checkpoint: str | os.PathLike) -> GivaModel:
    """Copy the trainable vectors of an ONNX Runtime checkpoint (a file `OrtTrainer.save` wrote, or a
    `training_artifacts` directory) into `adapted`, by their canonical names; returns `adapted`."""
    api = require("onnxruntime.training.api")
    path = Path(checkpoint)
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise ExportError(f"no checkpoint at {path}; pass a file OrtTrainer.save wrote or an artifacts directory")
    if any(a.merged for a in adapted.adapters().values()):
        raise ExportError("the adapted model is merged: call giva_fx.unmerge(adapted, model) before loading "
                          "new vectors, then merge again")
    with native_output_to_error(f"onnxruntime could not read the checkpoint {path}"):
        params = api.CheckpointState.load_checkpoint(path).parameters
    values = {}
    for name, param in trainable_parameters(adapted).items():
        if name not in params:
            raise ExportError(f"the checkpoint {path} has no {name}: it was not made from this adapted model")
        value = torch.from_numpy(np.array(params[name].data))
        if tuple(value.shape) != tuple(param.shape):
            raise ExportError(f"{name} has shape {tuple(value.shape)} in {path} and {tuple(param.shape)} in the "
                              "adapted model: the checkpoint was made from another adapted model")
        values[name] = value
    for name, param in trainable_parameters(adapted).items():  # all checked first: no half-loaded model
        param.copy_(values[name].to(param.dtype))
    return adapted
