"""The fine-tuning methods compared, each built on a fresh copy of a task's pretrained base.

    giva     giva_fx.adapt(init=Vr | VrUr | VrU2r | VrUrand): gradient bases, per layer
    random   giva_fx.adapt(init="random"): random orthonormal bases per layer (VeRA-like)
    vera     PEFT VeRA: one shared random A/B, trained lambda_b / lambda_d
    lora     PEFT LoRA (default init, lora_alpha=8)
    loraga   PEFT LoRA with LoRA-GA init (gradient SVD, `preprocess_loraga`, ArB2r, stable scale)
    head     only the task's head (floor: no block adapted)
    full     every parameter (ceiling)

All adapter methods adapt the same ops (`Task.giva_targets` == `Task.peft_targets`) and also train
the task's head in full. The gradient inits (giva, loraga) profile the same batches.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import giva_fx
from bench.tasks import Task
from giva_fx.capture import Captured

pipeline = importlib.import_module("giva_fx.adapt")  # the module (`giva_fx.adapt` is the function)

PROFILE_BATCHES = 4

#: the learning rates each family may be tuned over (the bounds of its search, `bench.search`); a
#: best learning rate on one of them is reported as "(edge)"
LR_BOUNDS: dict[str, tuple[float, float]] = {
    "giva": (1e-3, 1.0),
    "random": (1e-3, 1.0),
    "vera": (1e-3, 1.0),
    "head": (1e-3, 1.0),
    "lora": (1e-4, 1e-1),
    "loraga": (1e-4, 1e-1),
    "full": (1e-5, 1e-2),
}


@dataclass(frozen=True)
class Method:
    family: str
    rank: int = 0
    init: str = ""

    @property
    def name(self) -> str:
        if self.family == "giva":
            return f"giva {self.init} r={self.rank}"
        if self.family in ("head", "full"):
            return {"head": "head only", "full": "full fine-tuning"}[self.family]
        label = {"random": "giva random", "vera": "PEFT VeRA", "lora": "PEFT LoRA", "loraga": "PEFT LoRA-GA"}
        return f"{label[self.family]} r={self.rank}"

    def supported(self, task: Task) -> bool:
        if self.family == "vera":
            return task.peft_vera
        if self.family == "loraga":
            return task.peft_loraga
        return True


def relative_step_cost(method: Method) -> float:
    """A training step's time relative to GiVA r=8 on the same task, roughly (char GPT-2 and digits ViT
    runs: head-only skips most of the backward, LoRA adds two matmuls per op, VeRA's and random bases'
    cost grows with r)."""
    return {"head": 0.4, "full": 1.05, "lora": 1.2, "loraga": 1.2}.get(method.family, 0.96 + method.rank / 200)


@dataclass
class Built:
    model: nn.Module
    params: list[nn.Parameter]

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def _peft_targets(task: Task) -> str | list[str]:
    return task.peft_targets if isinstance(task.peft_targets, str) else list(task.peft_targets)


def _eager(base: nn.Module, patterns: tuple[str, ...]) -> Built:
    params = []
    for name, p in base.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
        if p.requires_grad:
            params.append(p)
    return Built(base, params)


#: one capture per task and process (see `_capture_once`)
_CAPTURED: dict[str, Captured] = {}


@contextlib.contextmanager
def _capture_once(key: str) -> Iterator[None]:
    """Within the block, adapt() captures the graph of `key` once per process and hands every later
    call a deep copy (the same graph, weights and buffers copied).

    Every run of a task adapts the same pretrained base on batches of the same shapes, so every capture
    gives the same graph; torch.export takes ~2 s for the char GPT-2 (a sixth of its 200-step run) and
    the copy ~0.04 s. Only the bench does this: adapt() itself always captures the model it is given."""
    if not hasattr(pipeline, "capture"):
        raise RuntimeError("giva_fx.adapt no longer calls capture(); update bench/methods.py")
    original = pipeline.capture

    def capture(model: nn.Module, sample: Any) -> Captured:
        if key not in _CAPTURED:
            _CAPTURED[key] = original(model, sample)
        c = _CAPTURED[key]
        return dataclasses.replace(c, graph_module=copy.deepcopy(c.graph_module))

    pipeline.capture = capture
    try:
        yield
    finally:
        pipeline.capture = original


def _giva(method: Method, task: Task, base: nn.Module, seed: int) -> Built:
    n = 1 if method.family == "random" else PROFILE_BATCHES  # random bases only need a capture batch
    with _capture_once(task.name):
            adapted = giva_fx.adapt(base, task.profile_batches(seed, n), rank=method.rank,
                                init="random" if method.family == "random" else method.init,
                                targets=task.giva_targets, train=[f"{h}.*" for h in task.head], seed=seed,
                                progress=False)
    return Built(adapted, list(giva_fx.trainable_parameters(adapted).values()))


def _peft(method: Method, task: Task, base: nn.Module, seed: int) -> Built:
    from peft import LoraConfig, LoraGAConfig, VeraConfig, get_peft_model, preprocess_loraga

    common = dict(target_modules=_peft_targets(task), fan_in_fan_out=task.fan_in_fan_out,
                  modules_to_save=list(task.head) or None)
    if method.family == "vera":
        config = VeraConfig(r=method.rank, projection_prng_key=seed, **common)
    elif method.family == "lora":
        config = LoraConfig(r=method.rank, **common)
    else:
        config = LoraConfig(r=method.rank, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(), **common)
        batches = task.profile_batches(seed, PROFILE_BATCHES)

        def train_step() -> None:  # PEFT averages over the backward calls itself
            for batch in batches:
                task.loss(base, batch).backward()

        preprocess_loraga(base, config, train_step)
    model = get_peft_model(base, config)
    return Built(model, [p for p in model.parameters() if p.requires_grad])


def build(method: Method, task: Task, seed: int) -> Built:
    """`method` on a fresh copy of `task`'s base, seeded by `seed`."""
    base = task.base()
    torch.manual_seed(seed)
    if method.family in ("giva", "random"):
        return _giva(method, task, base, seed)
    if method.family in ("vera", "lora", "loraga"):
        return _peft(method, task, base, seed)
    if method.family == "head":
        return _eager(base, task.floor)
    if method.family == "full":
        return _eager(base, ("*",))
    raise ValueError(f"unknown method family {method.family!r}")
