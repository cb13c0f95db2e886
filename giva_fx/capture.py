"""Capture: model + sample batch -> a plain, trainable `torch.fx.GraphModule` of aten ops.

`torch.export` (non-strict) is the one capture path: it handles HF transformers, timm and plain
modules alike and yields one op vocabulary (aten) for the matcher. The exported module is turned
into a plain GraphModule (so `.train()` works), every parameter is re-wrapped as a *new*, frozen
Parameter over the *same* storage (the user's flags stay untouched, memory does not double), and
buffers are cloned (so batch-norm statistics updated while training the adapted model never write
into the user's model). The model is captured in training mode so dropout nodes keep their rates;
`passes.mode` flips them for eval.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

from giva_fx.batches import Batch
from giva_fx.errors import BatchError, CaptureError, warn


@dataclass(frozen=True)
class Captured:
    """The captured graph, plus facts about the user's model it no longer shows."""

    graph_module: fx.GraphModule
    aliases: dict[str, tuple[str, ...]]  # parameter name -> every name of the same Parameter
    signature: tuple[int, tuple[str, ...]]  # (number of positional args, keyword names)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore each submodule's train/eval flag, parameter requires_grad flags and the HF config
    (`use_cache`, and whatever forward() writes into it, e.g. `problem_type`) on exit, even when
    the body raises."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    config = getattr(model, "config", None)
    settings = dict(vars(config)) if config is not None and hasattr(config, "__dict__") else None
    had_cache = config is not None and hasattr(config, "use_cache")
    use_cache = getattr(config, "use_cache", None) if had_cache else None
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        if settings is not None:
            for key in [k for k in vars(config) if k not in settings]:
                del vars(config)[key]
            vars(config).update(settings)
        if had_cache:
            config.use_cache = use_cache


def signature_of(batch: Batch) -> tuple[int, tuple[str, ...]]:
    """How the model is called: the number of positional args and the sorted keyword names."""
    return len(batch.args), tuple(sorted(batch.kwargs))


def check_model(model: nn.Module) -> None:
    """Refuse what cannot be captured before touching anything."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise CaptureError(
                f"parameter {name!r} is on the meta device (no data); load real weights first, "
                "e.g. model.to_empty(device='cpu') and then load a state dict"
            )


def _dynamic_shapes(model: nn.Module, batch: Batch) -> dict[str, object] | tuple[object, ...]:
    """Every dim of every tensor input may vary; export specialises those the model fixes."""
    def spec(v: object) -> object:
        return {i: Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None

    if not batch.kwargs:
        return tuple(spec(a) for a in batch.args)
    params = inspect.signature(model.forward).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < len(batch.args):
        raise BatchError(
            f"{type(model).__name__}.forward takes {len(names)} positional inputs but the batch "
            f"has {len(batch.args)}"
        )
    shapes = {n: spec(a) for n, a in zip(names, batch.args)}
    return {**shapes, **{k: spec(v) for k, v in batch.kwargs.items()}}


def _where(exc: BaseException) -> str:
    """The innermost user-code frame of a capture failure, so the error names the line."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/giva_fx/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} ({f.line})"


def _takes(model: nn.Module) -> str:
    """What `model.forward` accepts, for error messages."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return f"{type(model).__name__}.forward has no readable signature"
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return f"{type(model).__name__}.forward({', '.join(stars.get(p.kind, '') + p.name for p in params)})"


# keyword inputs a framework passes to every model that takes **kwargs, read or not:
# transformers.Trainer's token count for loss normalisation
FRAMEWORK_INPUTS = frozenset({"num_items_in_batch"})


def _warn_unused(model: nn.Module, ep: torch.export.ExportedProgram, batch: Batch) -> None:
    """Warn about keyword inputs the model never reads: usually a misspelled name that a
    ``**kwargs`` forward (as HF models have) swallowed. A tensor passed under two names is
    read once, so those are not judged, nor are `FRAMEWORK_INPUTS`."""
    seen = Counter(id(t) for t in batch.tensors())
    unique = {k for k, v in batch.kwargs.items()
              if isinstance(v, torch.Tensor) and seen[id(v)] == 1 and k not in FRAMEWORK_INPUTS}
    unused = [n.name for n in ep.graph.nodes if n.op == "placeholder" and n.name in unique and not n.users]
    if unused:
        warn(f"{type(model).__name__} ignores batch input(s) {unused}: check their names against "
             f"{_takes(model)}", stacklevel=3)


def _aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: tuple(names) for names in groups.values() for n in names}


def _rewrap(gm: fx.GraphModule) -> None:
    """New frozen Parameters over the same storage; cloned buffers. Ties are kept."""
    new: dict[int, nn.Parameter] = {}
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        q = new.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=False))
        setattr(gm.get_submodule(owner), attr, q)
    cloned: dict[int, torch.Tensor] = {}
    for name, b in list(gm.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner)
        module.register_buffer(attr, cloned.setdefault(id(b), b.detach().clone()))


# logger -> the level it is held at during export: dims export specialises (expected with
# all-dims-dynamic capture), and the full traceback fake tensors log for a failing op, which
# `capture` reports itself in one line as a CaptureError
_EXPORT_LOGS = MappingProxyType({"torch._export": logging.ERROR, "torch._subclasses.fake_tensor": logging.CRITICAL})


@contextlib.contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """Hold torch.export's noise (`_EXPORT_LOGS`) back from users while it runs."""
    loggers = {logging.getLogger(name): level for name, level in _EXPORT_LOGS.items()}
    before = {logger: logger.level for logger in loggers}
    try:
        for logger, level in loggers.items():
            logger.setLevel(level)
        yield
    finally:
        for logger, level in before.items():
            logger.setLevel(level)


def capture(model: nn.Module, batch: Batch) -> Captured:
    """Export `model` on `batch` with dynamic dims; the user's model is left exactly as it was."""
    check_model(model)
    if not batch.tensors():
        raise BatchError("the sample batch holds no tensor input; pass the model's real inputs")
    with preserved_state(model):
        model.train()
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            config.use_cache = False
        aliases = _aliases(model)
        shapes = _dynamic_shapes(model, batch)
        try:
            with _quiet_export_logs():
                ep = torch.export.export(model, batch.args, batch.kwargs, strict=False,
                                         dynamic_shapes=shapes)
        except Exception as exc:  # torch raises many types here; all mean "cannot capture"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}{_where(exc)}: {first}. "
                f"{_takes(model)}; the batch gave {len(batch.args)} positional input(s) and keywords "
                f"{sorted(batch.kwargs)}. Pass batches that match forward(); code that branches on "
                "tensor values or returns non-tensor objects cannot be captured"
            ) from exc
    _warn_unused(model, ep, batch)
    exported = ep.module()
    gm = fx.GraphModule(exported, exported.graph)
    _rewrap(gm)
    return Captured(gm, aliases, signature_of(batch))

