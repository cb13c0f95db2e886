"""Train/eval for captured graphs.

`torch.export` bakes the training flag of dropout and batch norm into node arguments, and HF
attention bakes its dropout rate into `scaled_dot_product_attention`. Graphs are captured in
training mode; this pass records those arguments once and switches them between the training
values and their eval values (no dropout, running statistics).
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.fx as fx

aten = torch.ops.aten

# fx target -> (argument index, keyword name, value in eval mode)
MODE_ARGS = MappingProxyType({
    aten.dropout.default: (2, "train", False),
    aten.feature_dropout.default: (2, "train", False),
    aten.alpha_dropout.default: (2, "train", False),
    aten.feature_alpha_dropout.default: (2, "train", False),
    aten.batch_norm.default: (5, "training", False),
    aten.scaled_dot_product_attention.default: (4, "dropout_p", 0.0),
})

_META_KEY = "giva_train_value"
_MISSING = object()


def _get(node: fx.Node, index: int, name: str) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, _MISSING)


def _set(node: fx.Node, index: int, name: str, value: object) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def set_training(gm: fx.GraphModule, training: bool) -> bool:
    """Put every mode-dependent node of `gm` in train or eval form; True if the graph changed."""
    changed = False
    for node in gm.graph.nodes:
        spec = MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        index, name, eval_value = spec
        current = _get(node, index, name)
        if current is _MISSING:
            continue
        train_value = node.meta.setdefault(_META_KEY, current)
        wanted = train_value if training else eval_value
        if current != wanted:
            _set(node, index, name, wanted)
            changed = True
    if changed:
        gm.recompile()
    return changed
