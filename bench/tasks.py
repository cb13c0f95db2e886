"""Fine-tuning tasks on offline data: a pretrained base, a shifted data stream, a metric.

Each task names the ops every method adapts (`giva_targets` for giva-fx, `peft_targets` for PEFT:
the same ops), the head that every method trains on top (`head`), and the data: training batches
drawn from a generator seeded by the run's seed (so every method sees the same data order per
seed), separate profiling batches for the gradient-based inits, and a fixed evaluation set.

    char_gpt2   char GPT-2 pretrained on stdlib code, fine-tuned on stdlib docstring prose
    digits_vit  ViT pretrained on upright digits, fine-tuned on digits turned by 90 degrees
    digits_cnn  the same with a conv net (PEFT VeRA and LoRA-GA support no conv: not compared)
    digits_mlp  residual MLPs of a given width, for the width sweep (pretrained in the bench)
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import CACHE, EXAMPLES, examples_path

examples_path()
import models as example_models  # noqa: E402  (examples/models.py)
import offline_data  # noqa: E402  (examples/offline_data.py)

Batch = Any
#: where the pretrained bases live (examples/pretrain.py writes them); overridable for experiments
ASSETS = os.environ.get("GIVA_BENCH_ASSETS", str(example_models.ASSETS_DIR))


@dataclass(frozen=True)
class Task:
    """A pretrained base, the ops to adapt, its data and its metric (see the module docstring)."""

    name: str
    title: str
    metric: str  # what `evaluate()["metric"]` is
    higher_is_better: bool
    giva_targets: tuple[str, ...]
    peft_targets: str | tuple[str, ...]
    head: tuple[str, ...]  # modules every method trains in full (PEFT modules_to_save)
    floor: tuple[str, ...]  # parameter name globs the head-only baseline trains
    fan_in_fan_out: bool  # GPT-2 Conv1D stores W as (in, out)
    peft_vera: bool  # PEFT VeRA supports these ops (Linear / Conv1D only)
    peft_loraga: bool
    base: Callable[[], nn.Module]
    batches: Callable[[int], Iterator[Batch]]  # seed -> endless training batches
    profile_batches: Callable[[int, int], list[Batch]]  # (seed, n) -> batches for gradient inits
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]  # "metric" plus extras
    asset: str | None = None  # the examples/pretrain.py base this task loads
    # seconds of one GiVA r=8 training step, one evaluation and one build on one quiet core (measured
    # 2026-12-05 with OMP_NUM_THREADS=1, load average < 1.5): for scheduling and the time estimate only
    step_s: float = 0.0
    eval_s: float = 0.0
    build_s: float = 0.0

    def ensure_base(self) -> None:
        """Pretrain the base with examples/pretrain.py when it is not there yet."""
        if self.asset is None or (Path(ASSETS) / f"{self.asset}.safetensors").exists():
            return
        print(f"{self.asset}: no pretrained base in {ASSETS}; running examples/pretrain.py --only {self.asset}",
              flush=True)
        subprocess.run([sys.executable, "pretrain.py", "--only", self.asset, "--out", ASSETS], cwd=EXAMPLES,
                       check=True)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b


# ----------------------------------------------------------------------------------- char GPT-2 --

LM_BATCH, LM_SEQ = 8, 64
LM_EVAL_WINDOWS = 64


@lru_cache(maxsize=1)
def _prose() -> tuple[torch.Tensor, torch.Tensor]:
    return offline_data.char_corpus_finetune()


def _lm_batches(seed: int) -> Iterator[Batch]:
    return offline_data.char_batches(_prose()[0], LM_BATCH, LM_SEQ, torch.Generator().manual_seed(seed))


def _lm_profile(seed: int, n: int) -> list[Batch]:
    stream = offline_data.char_batches(_prose()[0], LM_BATCH, LM_SEQ,
                                       torch.Generator().manual_seed(10_000 + seed))
    return [next(stream) for _ in range(n)]


def _lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return model(**batch).loss


@torch.no_grad()
def _lm_evaluate(model: nn.Module) -> dict[str, float]:
    """Validation bits per character on fixed consecutive windows of the held-out prose."""
    val = _prose()[1]
    ids = val[: LM_EVAL_WINDOWS * LM_SEQ].view(LM_EVAL_WINDOWS, LM_SEQ)
    losses = [model(input_ids=b, labels=b).loss.item() for b in ids.split(LM_BATCH * 4)]
    nats = sum(losses) / len(losses)
    return {"metric": nats / math.log(2), "loss": nats}


CHAR_GPT2 = Task(
    name="char_gpt2", title="char GPT-2: stdlib code -> docstring prose", metric="val bits/char",
    higher_is_better=False,
    giva_targets=("transformer.h.*.attn.c_attn.weight", "transformer.h.*.attn.c_proj.weight",
                  "transformer.h.*.mlp.c_fc.weight", "transformer.h.*.mlp.c_proj.weight"),
    peft_targets=("c_attn", "c_proj", "c_fc"), head=(), floor=("transformer.ln_f.*",),
    fan_in_fan_out=True, peft_vera=True, peft_loraga=True,
    base=lambda: example_models.load_base("char_gpt2", ASSETS),
    batches=_lm_batches, profile_batches=_lm_profile, loss=_lm_loss, evaluate=_lm_evaluate, asset="char_gpt2",
    step_s=0.046, eval_s=0.17, build_s=0.4,
)

# --------------------------------------------------------------------------------------- digits --

DIGITS_BATCH = 32


@lru_cache(maxsize=1)
def _rotated() -> Any:
    return offline_data.digits_shifted()


def _digits_batches(seed: int) -> Iterator[Batch]:
    data, gen = _rotated(), torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(data.y_train), (DIGITS_BATCH,), generator=gen)
        yield data.x_train[idx], data.y_train[idx]


def _digits_profile(seed: int, n: int) -> list[Batch]:
    stream = _digits_batches(10_000 + seed)
    return [next(stream) for _ in range(n)]


def _digits_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def _digits_evaluate(model: nn.Module) -> dict[str, float]:
    data = _rotated()
    logits = model(data.x_test)
    return {"metric": (logits.argmax(-1) == data.y_test).float().mean().item(),
            "loss": F.cross_entropy(logits, data.y_test).item()}


def _digits_task(name: str, title: str, giva_targets: tuple[str, ...], peft_targets: str | tuple[str, ...],
                 head: str, vera: bool, base: Callable[[], nn.Module], step_s: float, eval_s: float) -> Task:
    return Task(
        name=name, title=title, metric="test accuracy", higher_is_better=True,
        giva_targets=giva_targets, peft_targets=peft_targets, head=(head,), floor=(f"{head}.*",),
        fan_in_fan_out=False, peft_vera=vera, peft_loraga=vera, base=base,
        batches=_digits_batches, profile_batches=_digits_profile, loss=_digits_loss, evaluate=_digits_evaluate,
        asset=name, step_s=step_s, eval_s=eval_s, build_s=0.2,
    )


DIGITS_VIT = _digits_task(
    "digits_vit", "digits ViT: upright -> rotated 90 degrees",
    ("blocks.*.attn.qkv.weight", "blocks.*.attn.proj.weight", "blocks.*.mlp.fc1.weight", "blocks.*.mlp.fc2.weight"),
    r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))", "head", True,
    lambda: example_models.load_base("digits_vit", ASSETS), step_s=0.014, eval_s=0.06)

DIGITS_CNN = _digits_task(
    "digits_cnn", "digits CNN: upright -> rotated 90 degrees",
    ("features.*.weight", "head.1.weight"), r"features\.(0|3|7)|head\.1", "head.3", False,
    lambda: example_models.load_base("digits_cnn", ASSETS), step_s=0.0075, eval_s=0.045)


# --------------------------------------------------------------------------- width sweep (MLPs) --

class DigitsMLP(nn.Module):
    """Pixels -> width, two pre-norm residual MLP blocks of width x width linears, norm, head."""

    def __init__(self, width: int, depth: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


MLP_PRETRAIN_STEPS = 300


def pretrained_mlp(width: int) -> nn.Module:
    """A `DigitsMLP` pretrained briefly on upright digits, cached under bench/cache/."""
    from safetensors.torch import load_model, save_model

    from giva_fx.files import atomic_file

    path = CACHE / f"digits_mlp_w{width}_s{MLP_PRETRAIN_STEPS}.safetensors"
    torch.manual_seed(0)
    model = DigitsMLP(width)
    if path.exists():
        load_model(model, str(path))
        return model.eval()
    data, gen = offline_data.digits_pretrain(), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model.train()
    for _ in range(MLP_PRETRAIN_STEPS):
        idx = torch.randint(0, len(data.y_train), (64,), generator=gen)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with atomic_file(path) as tmp:
        save_model(model, str(tmp))
    return model.eval()


def digits_mlp(width: int) -> Task:
    """The head stays frozen (same classes as in pretraining), so the adapters do all the work."""
    return Task(
        name=f"digits_mlp_w{width}", title=f"digits MLP width {width}: upright -> rotated",
        metric="test accuracy", higher_is_better=True,
        giva_targets=("embed.weight", "blocks.*.weight"), peft_targets=r"embed|blocks\.\d+\.[13]",
        head=(), floor=("head.*",), fan_in_fan_out=False, peft_vera=True, peft_loraga=True,
        base=lambda: pretrained_mlp(width), batches=_digits_batches, profile_batches=_digits_profile,
        loss=_digits_loss, evaluate=_digits_evaluate,
        step_s=2e-3 + 1.1e-8 * width**2, eval_s=1e-3 + 3.8e-8 * width**2, build_s=0.1,
    )


TASKS: dict[str, Task] = {t.name: t for t in (CHAR_GPT2, DIGITS_VIT, DIGITS_CNN)}


def task(name: str) -> Task:
    if name.startswith("digits_mlp_w"):
        return digits_mlp(int(name.removeprefix("digits_mlp_w")))
    return TASKS[name]
