"""`giva_fx.export.peft_lora`: a GiVA adapter as a standard PEFT LoRA adapter directory.

GiVA's dW = diag(lambda_o) B diag(lambda_s) A is a LoRA update with the factors

    lora_A = A        lora_B = diag(lambda_o) B diag(lambda_s)        lora_alpha = r (scaling 1)

so the export is exact. The directory (``adapter_config.json`` + ``adapter_model.safetensors``)
loads with ``peft.PeftModel.from_pretrained(model, out_dir)`` and serves wherever LoRA adapters do.

PEFT attaches LoRA to modules, so an op is exported when its weight is the ``weight`` of an
``nn.Linear``, of a transformers ``Conv1D`` (stored in x out, ``fan_in_fan_out``), or of an
``nn.Conv1d/2d/3d`` without groups or dilation (PEFT's LoRA conv has neither). What PEFT cannot
express (functional ops on a bare parameter, an embedding used as a projection, ``train=``
parameters outside a module PEFT can copy whole, trained batch-norm statistics) is reported with a
warning and returned, never dropped silently. PEFT itself is not needed to write the directory.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from giva_fx.errors import ExportError, warn
from giva_fx.files import atomic_dir
from giva_fx.model import GivaModel
from giva_fx.passes.match import SkippedOp, WeightOp
from giva_fx.passes.mode import updated_buffers
from giva_fx.trainable import full_parameters

PREFIX = "base_model.model."  # how PEFT names the wrapped model in adapter files
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _lora_module(model: nn.Module, op: WeightOp) -> tuple[str, str | None]:
    """(owning module name, None) when PEFT LoRA can express `op`, else (name, why not)."""
    owner, _, attr = op.weight_name.rpartition(".")
    if attr != "weight" or not owner:
        return owner, "a bare parameter, not a module's weight (PEFT attaches LoRA to modules)"
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return owner, f"the model has no module {owner!r}; pass the model that was adapted"
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear) and op.layout == "out_in":
        return owner, None
    if conv1d is not None and isinstance(module, conv1d) and op.layout == "in_out":
        return owner, None
    if isinstance(module, _CONVS) and op.kind == "conv":
        if module.groups != 1 or any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
            return owner, "a conv with groups, dilation or non-zero padding mode, which PEFT's LoRA conv lacks"
        return owner, None
    return owner, (f"{owner} is a {type(module).__name__} used as a {op.kind} op; PEFT LoRA covers nn.Linear, "
                   "transformers Conv1D and nn.Conv1d/2d/3d modules")


def _lora_factors(adapter: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A = A and lora_B = diag(lambda_o) B diag(lambda_s), in the adapter's own shapes."""
    b = adapter.B.float().flatten(1)
    scaled = adapter.lambda_o.float()[:, None] * b * adapter.lambda_s.float()
    return adapter.A.detach().to(dtype), scaled.reshape(adapter.B.shape).detach().to(dtype)


def peft_lora(adapted: GivaModel, model: nn.Module, out_dir: str | os.PathLike[str], *,
              overwrite: bool = False) -> list[SkippedOp]:
    """Write `adapted` as a PEFT LoRA adapter directory for `model`; return what it could not express.

    Args:
        adapted: the model `giva_fx.adapt` (or `load_adapter`) returned, unmerged.
        model: the base model it was adapted from (PEFT attaches LoRA to its modules).
        out_dir: the adapter directory to write (atomically).
        overwrite: replace an existing `out_dir` (kept until the new one is complete).
    """
    adapters = adapted.adapters()
    if any(a.merged for a in adapters.values()):
        raise ExportError("the adapters are merged into the model; exporting them as LoRA on top would count dW "
                          "twice: call giva_fx.unmerge(adapted, model) first")
    left_out: list[SkippedOp] = []
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for op in adapted.found.ops:
        owner, why = _lora_module(model, op)
        if why is not None:
            left_out.append(SkippedOp(op.weight_name, op.kind, op.nodes, why))
            continue
        adapter = adapters[op.weight_name]
        dtype = model.get_parameter(op.weight_name).dtype
        tensors[f"{PREFIX}{owner}.lora_A.weight"], tensors[f"{PREFIX}{owner}.lora_B.weight"] = \
            _lora_factors(adapter, dtype)
        ranks[owner] = adapter.rank
        fan_in_fan_out |= op.layout == "in_out"
    if not ranks:
        raise ExportError("PEFT LoRA can express none of the adapted ops: "
                          + "; ".join(f"{s.weight_name} ({s.reason})" for s in left_out))
    to_save = _modules_to_save(adapted, model, ranks, tensors, left_out)
    left_out += _trained_buffers(adapted, model)
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "r": r, "lora_alpha": r,
        "rank_pattern": pattern, "alpha_pattern": pattern, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "target_modules": sorted(ranks), "modules_to_save": sorted(to_save) or None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        payload = {k: tensors[k].contiguous() for k in sorted(tensors)}
        safetensors.torch.save_file(payload, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    if left_out:
        warn(f"{Path(out_dir)}: PEFT LoRA cannot express "
             + "; ".join(f"{s.weight_name} ({s.reason})" for s in left_out), stacklevel=2)
    return left_out


def _modules_to_save(adapted: GivaModel, model: nn.Module, targets: dict[str, int],
                     tensors: dict[str, torch.Tensor], left_out: list[SkippedOp]) -> set[str]:
    """`train=` parameters as PEFT `modules_to_save`: each owning module is copied whole."""
    trained = full_parameters(adapted)
    owners: set[str] = set()
    for name in trained:
        owner = name.rpartition(".")[0]
        if not owner or any(t == owner or t.startswith(f"{owner}.") for t in targets):
            why = "a bare parameter" if not owner else f"{owner} (or a module in it) also carries a LoRA adapter"
            left_out.append(SkippedOp(name, "train", (), f"trained fully, but {why}: PEFT cannot save it"))
        else:
            owners.add(owner)
    for owner in owners:
        for key, value in model.get_submodule(owner).state_dict().items():
            tensors[f"{PREFIX}{owner}.{key}"] = trained.get(f"{owner}.{key}", value).detach().clone()
    return owners


def _trained_buffers(adapted: GivaModel, model: nn.Module) -> list[SkippedOp]:
    """Buffers training changed (batch-norm statistics): a LoRA adapter has no place for them."""
    own = dict(model.named_buffers())
    gm = adapted.graph_module
    return [SkippedOp(n, "buffer", (), "trained state (e.g. batch-norm statistics) that a LoRA adapter cannot "
                      "carry; use giva_fx.merge or save_adapter to keep it")
            for n in updated_buffers(gm) if n in own and not torch.equal(own[n], gm.get_buffer(n))]
