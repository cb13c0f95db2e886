"""`adapt()`: the pipeline capture -> match -> profile -> bases -> rewrite, as a list of stages."""
from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from giva_fx.adapters import ADAPTERS, make_adapter
from giva_fx.batches import Batch, as_batches
from giva_fx.capture import Captured, capture, signature_of
from giva_fx.distributed import fail_together, synchronized
from giva_fx.errors import BatchError, CaptureError, ConfigError, MatchError, warns_at_caller
from giva_fx.loss import LossFn
from giva_fx.model import AdaptReport, GivaModel
from giva_fx.passes.bases import Bases, check_init, check_rank, check_seed, compute_bases
from giva_fx.passes.match import MatchResult, WeightOp, match
from giva_fx.passes.profile import profile
from giva_fx.passes.rewrite import rewrite


@dataclass(frozen=True)
class AdaptConfig:
    """What to adapt and how; validated on construction. Each field is documented on `adapt`."""

    rank: int = 8
    init: str = "Vr"
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("linear", "conv")
    train: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_rank(self.rank)
        check_init(self.init)
        check_seed(self.seed)
        for field_name in ("targets", "exclude", "train", "kinds"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                object.__setattr__(self, field_name, (value,))
            elif value is not None:
                if not isinstance(value, Iterable) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{field_name} must be a string or a list of strings, got {value!r}")
                object.__setattr__(self, field_name, tuple(value))
        unknown = [k for k in self.kinds if k not in ADAPTERS]
        if unknown or not self.kinds:
            raise ConfigError(f"unknown op kinds {unknown or list(self.kinds)}; choose from {list(ADAPTERS)}")


def _gradient_2d(grad: torch.Tensor, op: WeightOp) -> torch.Tensor:
    """The gradient as (out x in), whatever the weight's stored layout."""
    return grad.T if op.layout == "in_out" else grad.reshape(op.out_features, op.in_features)


def _select(gm: fx.GraphModule, aliases: dict[str, tuple[str, ...]], config: AdaptConfig) -> MatchResult:
    found = match(gm, aliases=aliases, targets=config.targets, exclude=config.exclude,
                  kinds=config.kinds, train=config.train)
    if not found.ops and not config.train:
        seen = "; ".join(f"{s.weight_name or '?'} ({s.reason})" for s in found.skipped) or "none"
        raise MatchError(
            f"no op selected for adaptation (targets={config.targets}, exclude={config.exclude}, "
            f"kinds={config.kinds}); weight ops seen: {seen}. Adjust targets=/exclude=/kinds="
        )
    return found


def train_fully(gm: fx.GraphModule, patterns: Sequence[str]) -> tuple[str, ...]:
    """Give `train=` parameters their own trainable copy (the user's model is never written).

    A tied parameter (several names, one tensor) is matched by any of its names and gets ONE copy
    under all of them, so the tie holds while training; it is reported by its first name."""
    tied: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    chosen = [names for names in tied.values()
              if any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)]
    if patterns and not chosen:
        raise MatchError(f"train={list(patterns)} matches no parameter; names look like "
                         f"{[n for n, _ in gm.named_parameters()][:5]}")
    for names in chosen:
        trainable = nn.Parameter(gm.get_parameter(names[0]).detach().clone())
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(owner), attr, trainable)
    return tuple(names[0] for names in chosen)


def _profile_bases(gm: fx.GraphModule, samples: list[Batch], ops: Sequence[WeightOp], config: AdaptConfig,
                   loss_fn: LossFn | None, progress: bool) -> tuple[dict[str, Bases], list[float], float]:
    """Profile gradients and turn each into bases as soon as it is final; (bases, losses, svd seconds)."""
    by_name = {op.weight_name: op for op in ops}
    bases: dict[str, Bases] = {}
    svd_s = [0.0]

    def on_gradient(name: str, grad: torch.Tensor | None) -> None:
        op, start = by_name[name], time.perf_counter()
        bases[name] = compute_bases(None if grad is None else _gradient_2d(grad, op),
                                    out_features=op.out_features, in_features=op.in_features,
                                    rank=config.rank, init=config.init, seed=config.seed, name=name)
        svd_s[0] += time.perf_counter() - start

    with synchronized(gm, ops, config, len(samples), on_gradient, bases) as sink:  # across ranks, if any
        if config.init == "random":  # no gradient needed
            for name in by_name:
                sink(name, None)
            losses = []
        else:
            losses = profile(gm, samples, list(by_name), sink, loss_fn=loss_fn, progress=progress)
    return bases, losses, svd_s[0]


@warns_at_caller
def adapt(
    model: nn.Module,
    batches: Any,
    *,
    rank: int = 8,
    init: str = "Vr",
    loss_fn: LossFn | None = None,
    targets: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str = (),
    kinds: Sequence[str] = ("linear", "conv"),
    train: Sequence[str] | str = (),
    seed: int = 0,
    progress: bool = True,
) -> GivaModel:
    """Rewrite `model` into a GiVA-adapted `GivaModel`; `model` itself is not modified.

    Args:
        model: any nn.Module that `torch.export` can capture on `batches`.
        batches: one batch (tensor, dict of tensors, or `(inputs, target)`) or a list / DataLoader
            of them; gradients are averaged over all of them. The first one is used for capture,
            so the adapted model takes inputs of the same structure (other sizes are fine).
        rank: r, clamped per op to what its shape allows (with a warning naming the op).
        init: bases mode: "Vr" (default), "VrUr", "VrU2r", "VrUrand", or "random" (VeRA-like).
        loss_fn: `loss_fn(output, batch) -> scalar`; default: the model's own loss when it returns
            one (HF models given labels), else cross-entropy for `(inputs, integer target)`.
        targets: glob patterns on weight names to adapt (default: every op of the selected kinds
            except heads producing the model's output and tied weights).
        exclude: glob patterns of weights not to adapt.
        kinds: op kinds to adapt: "linear" (linear, addmm, mm, matmul) and "conv" (conv1d/2d/3d;
            transposed convs are skipped); the others are listed as skipped in `summary()`.
        train: glob patterns of parameters to train fully (e.g. a new classifier head).
        seed: seeds every random part of the bases (per op, independent of order and process).
        progress: show progress bars.
    """
    with fail_together():  # under DDP, a failure here stops every rank at the preflight
        config = AdaptConfig(rank=rank, init=init, targets=targets, exclude=exclude,
                             kinds=kinds, train=train, seed=seed)
        samples = as_batches(batches)
        t0 = time.perf_counter()
        captured = capture(model, samples[0])
        for i, sample in enumerate(samples[1:], 1):
            if signature_of(sample) != captured.signature:
                raise BatchError(f"batch {i} has inputs {signature_of(sample)}, unlike batch 0 "
                                 f"{captured.signature}; every batch must call the model the same way")
        t1 = time.perf_counter()
        found = _select(captured.graph_module, captured.aliases, config)
        full_train = train_fully(captured.graph_module, config.train)
    bases, losses, svd_s = _profile_bases(captured.graph_module, samples, found.ops, config, loss_fn, progress)
    t2 = time.perf_counter()
    adapted = assemble(captured, found, bases, config, full_train, source=model)
    adapted.report = AdaptReport(t1 - t0, t2 - t1 - svd_s, svd_s, time.perf_counter() - t2, tuple(losses))
    return adapted.train(model.training)


def assemble(captured: Captured, found: MatchResult, bases: dict[str, Bases], config: AdaptConfig,
             full_train: tuple[str, ...] = (), *, source: nn.Module | None = None) -> GivaModel:
    """Rewrite the captured graph with one adapter per op from ready bases (no profiling): the
    last stage of `adapt`, and all that loading a saved adapter needs after capture and match."""
    gm = captured.graph_module
    adapters = {op.weight_name: make_adapter(op, bases[op.weight_name], gm.get_parameter(op.weight_name))
                for op in found.ops}
    rewrite(gm, found.ops, adapters)
    return GivaModel(gm, found, config, AdaptReport(), captured.signature, full_train, source)


def capture_variant(adapted: GivaModel, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
    """Capture the source model for another input set and rewrite it with `adapted`'s own
    adapters, parameters and buffers (objects shared, nothing copied)."""
    captured = capture(adapted.source, Batch(tuple(args), dict(kwargs)))
    gm = captured.graph_module
    names = [op.weight_name for op in adapted.found.ops]
    found = match(gm, aliases=captured.aliases, targets=names, kinds=adapted.adapt_config.kinds)
    missing = sorted(set(names) - {op.weight_name for op in found.ops})
    if missing:
        raise CaptureError(f"with inputs {sorted(kwargs)} the model does not use adapted weights {missing}; "
                           "call it with the inputs it was adapted with")
    ours = adapted.graph_module
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        owner, _, attr = name.rpartition(".")
        try:
            shared = ours.get_parameter(name) if isinstance(tensor, nn.Parameter) else ours.get_buffer(name)
        except AttributeError:
            continue
        module = gm.get_submodule(owner)
        if isinstance(shared, nn.Parameter):
            setattr(module, attr, shared)
        else:
            module.register_buffer(attr, shared)
    rewrite(gm, found.ops, adapted.adapters())
    return gm
