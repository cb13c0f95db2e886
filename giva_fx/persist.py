"""Save and load GiVA adapters: one safetensors file, rebuilt onto a model without profiling.

A file holds, per adapted op, its bases ``<weight>.A`` (r x in) and ``<weight>.B`` (out x r)
and its vectors ``<weight>.lambda_s`` / ``.lambda_o`` (named as `trainable_parameters` names
them), the ``train=`` parameters, the buffers the graph updates while training (batch-norm
statistics), and ONE metadata entry ``giva_fx``: a JSON string with the format version, the
adapt() config, each op's kind, layout, rank and init, and the fingerprint (shape, dtype,
SHA-256) of every adapted base weight. A single metadata key keeps files byte-identical from run
to run: safetensors writes several keys in hash-map order.

Tensors keep the model's dtype. Bases that the per-op seed alone determines (B for Vr and
VrUrand, A and B for random) are left out when regenerating them reproduces the adapter's tensor
bit for bit; the file keeps their SHA-256 so a load can check the regeneration.

Only safetensors is parsed and nothing is unpickled, so an adapter file cannot run code.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.fx as fx

from giva_fx.adapt import AdaptConfig, assemble, train_fully
from giva_fx.batches import as_batches
from giva_fx.capture import capture
from giva_fx.distributed import on_rank_zero
from giva_fx.errors import AdapterFileError, ConfigError, warn, warns_at_caller
from giva_fx.files import atomic_file
from giva_fx.fingerprint import differences, dtype_name, fingerprint, tensor_digest
from giva_fx.model import GivaModel
from giva_fx.passes.bases import INIT_MODES, Bases, op_seed, seeded_bases
from giva_fx.passes.match import MatchResult, SkippedOp, WeightOp, match
from giva_fx.passes.mode import updated_buffers
from giva_fx.trainable import VECTORS, full_parameters, trainable_parameters

FORMAT = 1
META_KEY = "giva_fx"
BASES = ("A", "B")


def _bases_2d(adapter: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A as (r x in) and B as (out x r), whatever shape the adapter keeps them in (conv kernels)."""
    rank = adapter.rank
    return {"A": adapter.A.reshape(rank, -1), "B": adapter.B.reshape(-1, rank)}


def _op_entry(op: WeightOp, adapter: torch.nn.Module, seed: int, compact: bool,
              tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    bases = _bases_2d(adapter)
    regenerated: dict[str, str] = {}
    if compact:
        seeded = seeded_bases(adapter.init, op.out_features, op.in_features, adapter.rank,
                              op_seed(seed, op.weight_name))
        for key, value in seeded.items():
            ours = bases[key].detach().cpu()
            if torch.equal(value.to(ours.dtype), ours):
                regenerated[key] = tensor_digest(ours)
                del bases[key]
    tensors.update({f"{op.weight_name}.{k}": v for k, v in bases.items()})
    return {"kind": op.kind, "layout": op.layout, "weight_shape": list(op.weight_shape),
            "out_features": op.out_features, "in_features": op.in_features, "rank": adapter.rank,
            "init": adapter.init, "dtype": dtype_name(adapter.A.dtype), "regenerated": regenerated}


def save_adapter(adapted: GivaModel, path: str | os.PathLike[str], *, compact: bool = True) -> Path:
    """Write the adapters of `adapted` (and its ``train=`` parameters) to one .safetensors file.

    The write is atomic: a failure leaves any previous file at `path` as it was (missing parent
    directories are created). The same adapted model always gives the same bytes. Under
    torch.distributed, rank 0 writes and every rank returns once the file is there (or raises).

    Args:
        adapted: what `adapt` or `load_adapter` returned, unmerged.
        path: the file to write.
        compact: leave out the bases that the seed regenerates bit for bit (about half the file
            for the default init "Vr"); False stores every basis.
    """
    if not isinstance(adapted, GivaModel):
        raise AdapterFileError(f"save_adapter takes the GivaModel that adapt() returned, got {type(adapted).__name__}")
    adapters = adapted.adapters()
    merged = [n for n, a in adapters.items() if a.merged]
    if merged:
        raise AdapterFileError(f"the adapters of {merged[:3]} are merged into the model, so its weights are no "
                               "longer the base weights; call giva_fx.unmerge(adapted, model) before saving")
    path = Path(path)
    if path.is_dir():
        raise AdapterFileError(f"cannot write {path}: it is a directory; give a file path")
    gm, config = adapted.graph_module, adapted.adapt_config
    tensors: dict[str, torch.Tensor] = {}
    ops = {op.weight_name: _op_entry(op, adapters[op.weight_name], config.seed, compact, tensors)
           for op in adapted.found.ops}
    tensors.update(trainable_parameters(adapted))
    buffers = updated_buffers(gm)
    tensors.update({n: gm.get_buffer(n) for n in buffers})
    from giva_fx import __version__

    meta = {"format": FORMAT, "giva_fx_version": __version__, "config": dataclasses.asdict(config),
            "ops": ops, "train": list(adapted.full_train), "buffers": buffers,
            "fingerprint": fingerprint(gm, ops)}
    header = {META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    payload = {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}

    def write() -> None:
        with atomic_file(path) as tmp:
            safetensors.torch.save_file(payload, tmp, metadata=header)

    on_rank_zero(write, f"to write {path}")
    return path


def _malformed(path: Path, why: str) -> AdapterFileError:
    return AdapterFileError(f"{path} is not a valid giva-fx adapter file: {why}")


def _check_layout(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Every op has its tensors, with the shapes its metadata implies."""
    for name, e in meta["ops"].items():
        r, out_f, in_f = e["rank"], e["out_features"], e["in_features"]
        if e["init"] not in INIT_MODES or not set(e["regenerated"]) <= set(BASES):
            raise _malformed(path, f"{name}: unknown init {e['init']!r} or bases {sorted(e['regenerated'])}")
        if not isinstance(getattr(torch, e["dtype"], None), torch.dtype):
            raise _malformed(path, f"{name}: unknown dtype {e['dtype']!r}")
        shapes = {"A": (r, in_f), "B": (out_f, r), "lambda_s": (r,), "lambda_o": (out_f,)}
        for key, shape in shapes.items():
            if key in e["regenerated"]:
                continue
            t = tensors.get(f"{name}.{key}")
            if t is None or tuple(t.shape) != shape:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise _malformed(path, f"tensor {name}.{key} is {got}, expected shape {shape}")
    for name in [*meta["train"], *meta["buffers"]]:
        if name not in tensors:
            raise _malformed(path, f"tensor {name} is missing")


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of an adapter file, checked for consistency; reads safetensors only."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as exc:  # safetensors raises its own error types for anything it cannot parse
        raise AdapterFileError(f"{path} is not a readable safetensors file ({exc}); giva-fx reads adapters only "
                               "from the .safetensors files save_adapter writes, and never unpickles") from exc
    if META_KEY not in header:
        raise _malformed(path, f"it has no {META_KEY!r} metadata; was it written by giva_fx.save_adapter?")
    try:
        meta = json.loads(header[META_KEY])
        version = meta["format"]
        if version > FORMAT:
            raise AdapterFileError(f"{path} has format {version}, newer than this giva-fx reads ({FORMAT}); "
                                   "upgrade giva-fx")
        _check_layout(path, meta, tensors)
    except (ValueError, KeyError, TypeError) as exc:
        raise _malformed(path, f"its metadata is incomplete or corrupt ({type(exc).__name__}: {exc})") from exc
    return meta, tensors


def _unfit_ops(meta: dict[str, Any], found: MatchResult, gm: fx.GraphModule) -> dict[str, str]:
    """Ops of the file this model cannot take (missing, other shape, kind or layout), with why."""
    ours = {op.weight_name: op for op in found.ops}
    skipped = {s.weight_name: s.reason for s in found.skipped}
    params = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    unfit: dict[str, str] = {}
    for name, e in meta["ops"].items():
        op = ours.get(name)
        if op is None:
            unfit[name] = (f"not adapted in this model ({skipped[name]})" if name in skipped
                           else "not in the model" if name not in params else "not used by a weight op")
        elif list(op.weight_shape) != e["weight_shape"]:
            unfit[name] = f"shape {tuple(e['weight_shape'])} in the file, {op.weight_shape} in the model"
        elif (op.kind, op.layout) != (e["kind"], e["layout"]):
            unfit[name] = f"a {e['kind']}/{e['layout']} op in the file, {op.kind}/{op.layout} in the model"
    return unfit


def _unfit_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor], gm: fx.GraphModule) -> dict[str, str]:
    """`train=` parameters and buffers of the file this model has not got in the same shape."""
    have = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    unfit = {}
    for name in [*meta["train"], *meta["buffers"]]:
        if name not in have:
            unfit[name] = "not in the model"
        elif have[name].shape != tensors[name].shape:
            unfit[name] = f"shape {tuple(tensors[name].shape)} in the file, {tuple(have[name].shape)} in the model"
    return unfit


def _listing(problems: dict[str, str]) -> str:
    return "".join(f"\n  {name}: {why}" for name, why in problems.items())


def _bases(meta: dict[str, Any], tensors: dict[str, torch.Tensor], op: WeightOp, seed: int) -> Bases:
    e = meta["ops"][op.weight_name]
    found = {k: tensors[f"{op.weight_name}.{k}"] for k in BASES if k not in e["regenerated"]}
    if e["regenerated"]:
        seeded = seeded_bases(e["init"], e["out_features"], e["in_features"], e["rank"], op_seed(seed, op.weight_name))
        for key, digest in e["regenerated"].items():
            if key not in seeded:
                raise AdapterFileError(f"{op.weight_name}: basis {key} is not in the file and init {e['init']!r} "
                                       "cannot regenerate it; the file is corrupt")
            found[key] = seeded[key]
            if tensor_digest(seeded[key].to(getattr(torch, e["dtype"]))) != digest:
                warn(f"{op.weight_name}: basis {key} regenerated from the seed differs from the saved one "
                     "in its last bits (another torch build?); outputs may differ at rounding level",
                     stacklevel=3)
    return Bases(found["A"], found["B"], e["init"])


@warns_at_caller
def load_adapter(model: torch.nn.Module, path: str | os.PathLike[str], sample_batch: Any, *,
                 strict: bool = True) -> GivaModel:
    """Rebuild the adapted model saved at `path` on top of `model`, without profiling.

    The model is captured on `sample_batch` (its inputs only; as for `adapt`, the adapted model
    then takes inputs of the same structure) and `model` itself is left untouched.

    Args:
        model: the base model the adapter was trained on.
        path: a file written by `save_adapter`.
        sample_batch: one batch of the model's inputs, in any form `adapt` accepts.
        strict: refuse (AdapterFileError, naming every weight that differs) unless each adapted
            weight has the shape, dtype and values it had when the adapter was trained. False
            applies the adapter wherever the shapes fit, and warns about what it skipped and
            about weights whose values differ.
    """
    path = Path(path)
    meta, tensors = read_adapter(path)
    try:
        config = AdaptConfig(**meta["config"])
    except (ConfigError, TypeError) as exc:
        raise _malformed(path, f"its adapt() config cannot be used here ({exc})") from exc
    captured = capture(model, as_batches(sample_batch)[0])
    gm = captured.graph_module
    found = match(gm, aliases=captured.aliases, targets=config.targets, exclude=config.exclude,
                  kinds=config.kinds, train=config.train)
    unfit = {**_unfit_ops(meta, found, gm), **_unfit_state(meta, tensors, gm)}
    fits = [n for n in meta["ops"] if n not in unfit]
    changed = differences({n: meta["fingerprint"][n] for n in fits}, fingerprint(gm, fits))
    if strict and (unfit or changed):
        raise AdapterFileError(
            f"{path} does not fit this model; {len(unfit) + len(changed)} weight(s) differ from those it was "
            f"trained on:{_listing({**unfit, **changed})}\nLoad it onto the model it was saved from, or pass "
            "strict=False to apply it wherever the shapes fit")
    if unfit:
        warn(f"{path}: skipped what this model cannot take:{_listing(unfit)}", stacklevel=2)
    if changed:
        warn(f"{path}: applied onto weights that differ from those it was trained on:{_listing(changed)}",
             stacklevel=2)
    kept = tuple(op for op in found.ops if op.weight_name in fits)
    extra = tuple(SkippedOp(op.weight_name, op.kind, op.nodes, "not in the adapter file")
                  for op in found.ops if op.weight_name not in meta["ops"])
    train = [n for n in meta["train"] if n not in unfit]
    full_train = train_fully(gm, [glob.escape(n) for n in train])
    bases = {op.weight_name: _bases(meta, tensors, op, config.seed) for op in kept}
    adapted = assemble(captured, MatchResult(kept, found.skipped + extra), bases, config, full_train, source=model)
    with torch.no_grad():
        for name, adapter in adapted.adapters().items():
            for v in VECTORS:
                getattr(adapter, v).copy_(tensors[f"{name}.{v}"])
        for name, param in full_parameters(adapted).items():
            param.copy_(tensors[name])
        for name in meta["buffers"]:
            if name not in unfit:
                gm.get_buffer(name).copy_(tensors[name])
    return adapted.train(model.training)
