"""Train/eval for captured graphs.

`torch.export` bakes the training flag of dropout and batch norm into node arguments, and HF
attention bakes its dropout rate into `scaled_dot_product_attention`. Graphs are captured in
training mode; this pass records those arguments once and switches them between the training
values and their eval values (no dropout, running statistics). `updated_buffers` names the
buffers a graph updates in training mode: state to save along with the trained vectors.
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


def _mode_spec(node: fx.Node) -> tuple[int, str, object] | None:
    """(argument index, keyword name, eval value) of a mode-dependent node, else None. Besides
    `MODE_ARGS`, batch norm's step counter (`num_batches_tracked += 1`) must not count in eval."""
    if node.op != "call_function":
        return None
    if node.target is aten.add_.Tensor:
        counter = node.args[0]
        is_counter = isinstance(counter, fx.Node) and counter.op == "get_attr" and \
            str(counter.target).endswith("num_batches_tracked")
        return (1, "other", 0) if is_counter else None
    return MODE_ARGS.get(node.target)


def set_training(gm: fx.GraphModule, training: bool) -> bool:
    """Put every mode-dependent node of `gm` in train or eval form; True if the graph changed."""
    changed = False
    for node in gm.graph.nodes:
        spec = _mode_spec(node)
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


# composite ops that update running statistics although their schema does not mark them written,
# and where their flag for doing so is: (argument index, keyword name)
_RUNNING_STATS = MappingProxyType({aten.batch_norm.default: (5, "training"),
                                   aten.instance_norm.default: (5, "use_input_stats")})


def written_inputs(node: fx.Node, *, as_trained: bool = True) -> list[fx.Node]:
    """The inputs `node` writes in place: by its schema, plus batch norm's running statistics,
    which it writes in the training form of the graph (`as_trained`) or if its flag now says so."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return []
    flag = _RUNNING_STATS.get(node.target)
    stats = flag is not None and (as_trained or _get(node, *flag) is True)
    values = [*node.args, *(node.kwargs.get(a.name) for a in schema.arguments[len(node.args):])]
    return [value for arg, value in zip(schema.arguments, values)
            if isinstance(value, fx.Node) and ((arg.alias_info is not None and arg.alias_info.is_write)
                                               or (stats and arg.name in ("running_mean", "running_var")))]


def is_eval_noop(node: fx.Node) -> bool:
    """True for batch norm's step counter in eval form, which adds 0: a node that can be dropped."""
    spec = _mode_spec(node)
    return spec is not None and node.target is aten.add_.Tensor and _get(node, *spec[:2]) == spec[2]


def updated_buffers(gm: fx.GraphModule) -> list[str]:
    """Buffers the graph writes in place while training (batch-norm statistics): trained state."""
    buffers = {n for n, _ in gm.named_buffers()}
    return sorted({value.target for node in gm.graph.nodes for value in written_inputs(node)
                   if value.op == "get_attr" and value.target in buffers})
