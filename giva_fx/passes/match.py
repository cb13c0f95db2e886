"""Match: find the weight ops of a captured graph and decide which of them to adapt.

A weight op is a linear-type or conv op whose weight operand is a parameter of the model (directly,
or through a transpose, as in ``x @ W.T``). `OP_TABLE` says, per aten target, where the input and
the weight sit and how the weight is laid out. `match` returns every weight op found: the selected
ones as `WeightOp` (one per weight; a weight used by several nodes, e.g. a module called twice, is
one op with several nodes) and the rest as `SkippedOp` with the reason.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True)
class OpSpec:
    """Where an op keeps its operands, and how its weight is stored."""

    kind: str  # "linear" | "conv"
    input_arg: int
    weight_arg: int
    layout: str  # "out_in": W is (out, in); "in_out": W is (in, out) as in GPT-2's Conv1D; "conv"


OP_TABLE = MappingProxyType({
    aten.linear.default: OpSpec("linear", 0, 1, "out_in"),
    aten.addmm.default: OpSpec("linear", 1, 2, "in_out"),
    aten.mm.default: OpSpec("linear", 0, 1, "in_out"),
    aten.matmul.default: OpSpec("linear", 0, 1, "in_out"),
    aten.conv1d.default: OpSpec("conv", 0, 1, "conv"),
    aten.conv2d.default: OpSpec("conv", 0, 1, "conv"),
    aten.conv3d.default: OpSpec("conv", 0, 1, "conv"),
    aten.conv1d.padding: OpSpec("conv", 0, 1, "conv"),
    aten.conv2d.padding: OpSpec("conv", 0, 1, "conv"),
    aten.conv3d.padding: OpSpec("conv", 0, 1, "conv"),
    aten.convolution.default: OpSpec("conv", 0, 1, "conv"),
    aten.conv_transpose1d.default: OpSpec("conv", 0, 1, "conv"),
    aten.conv_transpose2d.input: OpSpec("conv", 0, 1, "conv"),
    aten.conv_transpose3d.input: OpSpec("conv", 0, 1, "conv"),
})
_TRANSPOSED_CONVS = frozenset({aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input})

# ops that only reshape or pass a value on: a weight op reaching the output through these alone
# produces the model's output (a head)
VIEW_LIKE = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
    aten.squeeze.default, aten.squeeze.dims, aten.unsqueeze.default, aten.permute.default,
    aten.transpose.int, aten.contiguous.default, aten.clone.default, aten.flatten.using_ints,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
    aten.dropout.default, aten.slice.Tensor, aten.select.int, aten.detach.default,
})
_TRANSPOSES = frozenset({aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default})
_SWAPPING_PERMS = ([1, 0], (1, 0))


@dataclass(frozen=True)
class ConvArgs:
    """How a conv op slides its weight over the input, as the aten node says (defaults filled in)."""

    ndim: int  # spatial dims: 1, 2 or 3
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # a string ("same" / "valid") for aten.convNd.padding
    dilation: tuple[int, ...]
    groups: int
    transposed: bool = False  # aten.conv_transposeNd, or aten.convolution with transposed=True


def _per_dim(value: object, ndim: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return values * ndim if len(values) == 1 else values


def conv_args(node: fx.Node, ndim: int) -> ConvArgs:
    """The `ConvArgs` of an aten conv node with an `ndim`-D kernel."""
    args = node.normalized_arguments(node.graph.owning_module, normalize_to_only_use_kwargs=True).kwargs
    padding = args["padding"]
    return ConvArgs(ndim, _per_dim(args["stride"], ndim),
                    padding if isinstance(padding, str) else _per_dim(padding, ndim),
                    _per_dim(args["dilation"], ndim), int(args["groups"]),
                    node.target in _TRANSPOSED_CONVS or bool(args.get("transposed", False)))


@dataclass(frozen=True)
class WeightOp:
    """A weight the rewrite will adapt, with the graph nodes that use it."""

    weight_name: str
    kind: str
    layout: str
    nodes: tuple[str, ...]
    weight_shape: tuple[int, ...]
    out_features: int
    in_features: int  # for conv: in_channels / groups * prod(kernel)
    conv: ConvArgs | None = None  # for conv ops: stride, padding, dilation, groups


@dataclass(frozen=True)
class SkippedOp:
    """A weight op that is not adapted, and why."""

    weight_name: str | None
    kind: str
    nodes: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class MatchResult:
    ops: tuple[WeightOp, ...]
    skipped: tuple[SkippedOp, ...]


@dataclass(frozen=True)
class _Use:
    node: fx.Node
    spec: OpSpec
    weight_name: str
    layout: str
    conv: ConvArgs | None = None


def _param_operand(gm: fx.GraphModule, arg: object) -> tuple[str, bool] | None:
    """(parameter name, transposed?) when `arg` is a model parameter or its 2-D transpose."""
    if not isinstance(arg, fx.Node):
        return None
    transposed = False
    if arg.op == "call_function" and arg.target in _TRANSPOSES:
        if arg.target is aten.permute.default and arg.args[1] not in _SWAPPING_PERMS:
            return None
        transposed, arg = True, arg.args[0]
        if not isinstance(arg, fx.Node):
            return None
    if arg.op != "get_attr":
        return None
    try:
        value = gm.get_parameter(arg.target)
    except AttributeError:
        return None
    if transposed and value.dim() != 2:
        return None
    return arg.target, transposed


def _flip(layout: str) -> str:
    return {"out_in": "in_out", "in_out": "out_in"}[layout]


def _uses(gm: fx.GraphModule) -> tuple[list[_Use], list[SkippedOp]]:
    uses: list[_Use] = []
    skipped: list[SkippedOp] = []
    for node in gm.graph.nodes:
        spec = OP_TABLE.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        operand = _param_operand(gm, node.args[spec.weight_arg]) if len(node.args) > spec.weight_arg else None
        if operand is None:
            if spec.kind == "linear" and _param_operand(gm, node.args[spec.input_arg]) is not None:
                skipped.append(SkippedOp(_param_operand(gm, node.args[spec.input_arg])[0], spec.kind,
                                         (node.name,), "the parameter is the left operand (W @ x)"))
            continue
        name, transposed = operand
        weight = gm.get_parameter(name)
        if not weight.is_floating_point():
            skipped.append(SkippedOp(name, spec.kind, (node.name,),
                                     f"weight dtype {weight.dtype} is not floating point (nothing to train)"))
            continue
        if spec.kind == "linear" and weight.dim() != 2:
            skipped.append(SkippedOp(name, spec.kind, (node.name,), f"weight is {weight.dim()}-D, not 2-D"))
            continue
        if spec.kind == "conv":
            conv = conv_args(node, weight.dim() - 2)
            if conv.transposed:
                skipped.append(SkippedOp(name, spec.kind, (node.name,), "transposed convolution (not supported)"))
            else:
                uses.append(_Use(node, spec, name, spec.layout, conv))
            continue
        layout = _flip(spec.layout) if transposed else spec.layout
        uses.append(_Use(node, spec, name, layout))
    return uses, skipped


def produces_output(node: fx.Node) -> bool:
    """True when `node` reaches the graph output through view-like ops only."""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user.op == "output":
                return True
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and (user.target in VIEW_LIKE or getattr(user.target, "__name__", "") == "getitem"):
                frontier.append(user)
    return False


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def weight_features(weight: torch.Tensor, layout: str) -> tuple[int, int]:
    """(out_features, in_features) of a weight in the given layout."""
    if layout == "out_in":
        return weight.shape[0], weight.shape[1]
    if layout == "in_out":
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], int(weight[0].numel())


def match(
    gm: fx.GraphModule,
    *,
    aliases: dict[str, tuple[str, ...]] | None = None,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    kinds: Sequence[str] = ("linear", "conv"),
    train: Sequence[str] = (),
) -> MatchResult:
    """Select the weight ops to adapt.

    `targets` / `exclude` / `train` are glob patterns on the weight's qualified name. Without
    `targets`, heads (ops producing the model's output) and tied weights are skipped; a weight
    named by `targets` is adapted even when it is a head or tied.
    """
    aliases = aliases or {}
    uses, skipped = _uses(gm)
    by_weight: dict[str, list[_Use]] = {}
    for use in uses:
        by_weight.setdefault(use.weight_name, []).append(use)
    ops: list[WeightOp] = []
    for name, group in by_weight.items():
        nodes = tuple(u.node.name for u in group)
        kind = group[0].spec.kind

        def skip(reason: str) -> None:
            skipped.append(SkippedOp(name, kind, nodes, reason))

        others = [a for a in aliases.get(name, (name,)) if a != name]
        if kind not in kinds:
            skip(f"kind {kind!r} not selected (kinds={tuple(kinds)})")
        elif (pattern := _matches(name, train)) is not None:
            skip(f"trained fully (train={pattern!r})")
        elif (pattern := _matches(name, exclude)) is not None:
            skip(f"excluded by {pattern!r}")
        elif targets is not None and _matches(name, targets) is None:
            skip("not matched by targets")
        elif len({u.layout for u in group}) > 1:
            skip("used with different layouts")
        elif len({u.conv for u in group}) > 1:
            skip("used by convs with different stride/padding/dilation/groups")
        elif targets is None and others:
            skip(f"tied to {', '.join(others)}; name it in targets= to adapt it")
        elif targets is None and any(produces_output(u.node) for u in group):
            skip("produces the model's output (a head); name it in targets= or train= to change that")
        else:
            weight = gm.get_parameter(name)
            out_f, in_f = weight_features(weight, group[0].layout)
            ops.append(WeightOp(name, kind, group[0].layout, nodes, tuple(weight.shape), out_f, in_f, group[0].conv))
    return MatchResult(tuple(ops), tuple(skipped))
