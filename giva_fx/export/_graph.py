"""What every export shares: the adapted graph in eval form behind a flat tensor interface, one set of
exporter settings, and ONNX initializers named the way `trainable_parameters` names them.

The exported graph is a *copy* of the adapted graph (nodes copied, tensors and adapters shared), so
switching it to eval form or folding dW into its weights never touches the adapted or the user's model.
"""
from __future__ import annotations

import copy
import importlib
import io
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch import nn

from giva_fx.batches import Batch
from giva_fx.capture import preserved_state
from giva_fx.errors import ExportError
from giva_fx.loss import logits_of, own_loss
from giva_fx.model import GivaModel
from giva_fx.passes.mode import set_training
from giva_fx.passes.rewrite import ADAPTER_ROOT

if TYPE_CHECKING:
    import onnx as onnx_lib

# The TorchScript exporter at opset 15 without constant folding is the one path where every lambda
# stays a trainable initializer and ORT 1.19 can differentiate the whole graph: the dynamo exporter
# folds `lambda.view(...)` into constants (or emits CastLike, which has no gradient in ORT 1.19),
# opset >= 17 emits LayerNormalization, whose gradient ORT 1.19 cannot build inside a network, and
# training=TRAINING keeps equal-valued lambdas as separate initializers instead of merging them.
EXPORTER = MappingProxyType({"dynamo": False, "opset_version": 15, "do_constant_folding": False})
MAX_IR_VERSION = 10  # the newest ONNX IR that onnxruntime(-training) 1.19 loads
WRAPPER_ROOT = "graph"  # the exported module's attribute holding the graph: initializer names start with it
GUARDS = "_guards_fn"  # the submodule torch.export adds to check input shapes
STATIC_DIMS = "giva_static_dims"  # gm.meta key: (placeholder, dim) pairs whose size the graph bakes in
aten = torch.ops.aten

INSTALL_HINT = ("pip install onnxruntime-training==1.19.2 onnx==1.17.0 (onnxruntime-training provides the "
                "`onnxruntime` module: do not install plain onnxruntime next to it)")


def require(module: str) -> Any:
    """Import an optional dependency, or say what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"giva_fx.export needs `{module}`: {INSTALL_HINT}") from exc


@dataclass(frozen=True)
class Slot:
    """One ONNX graph input and where a batch holds it: a positional index or a keyword."""

    name: str
    key: int | str
    dtype: str  # torch dtype name, e.g. "int64"

    def take(self, batch: Batch) -> torch.Tensor:
        value = batch.args[self.key] if isinstance(self.key, int) else batch.kwargs.get(self.key)
        if not isinstance(value, torch.Tensor):
            where = f"positional input {self.key}" if isinstance(self.key, int) else f"key {self.key!r}"
            raise ExportError(f"the batch has no tensor at {where} (ONNX input {self.name!r}); pass batches "
                              "of the form the model was exported with")
        return value


def input_slots(batch: Batch, *, skip: Sequence[str] = ()) -> tuple[Slot, ...]:
    """A slot per tensor input of `batch`: keywords by their name, positional inputs as `input` (one)
    or `input_<i>` (several). Keywords in `skip` are left out (they stay at their sample value)."""
    single = len(batch.args) == 1
    slots = [Slot("input" if single else f"input_{i}", i, str(a.dtype).removeprefix("torch."))
             for i, a in enumerate(batch.args) if isinstance(a, torch.Tensor)]
    slots += [Slot(k, k, str(v.dtype).removeprefix("torch.")) for k, v in batch.kwargs.items()
              if isinstance(v, torch.Tensor) and k not in skip]
    return tuple(slots)


def eval_graph(adapted: GivaModel, batch: Batch, *, merged: bool) -> fx.GraphModule:
    """A copy of the graph that takes `batch`'s inputs, in eval form (no dropout, batch norm on running
    statistics), sharing every tensor and adapter; `merged` drops the adapters and uses W + dW instead."""
    if any(a.merged for a in adapted.adapters().values()):
        raise ExportError("the adapted model is merged (giva_fx.merge): its adapters are switched off. Export "
                          "before merging, or call giva_fx.unmerge(adapted, model) first")
    source = adapted.graph_for(batch.args, batch.kwargs)
    gm = fx.GraphModule(source, copy.deepcopy(source.graph))
    for node in list(gm.graph.nodes):  # torch.export's input-shape checks; they cannot take traced sizes
        if node.op == "call_module" and node.target == GUARDS and not node.users:
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target in _ONNX_FORMS:
            node.target = _ONNX_FORMS[node.target]
    gm.meta[STATIC_DIMS] = _traced_sizes(gm)
    gm.delete_all_unused_submodules()
    gm.recompile()
    set_training(gm, False)
    if merged:
        _fold_adapters(gm)
    return gm


def _slice(x: torch.Tensor, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> torch.Tensor:
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


def _arange(*args: Any, dtype: Any = None, layout: Any = None, device: Any = None,
            pin_memory: Any = None) -> torch.Tensor:
    return torch.arange(*args, dtype=dtype, device=device)


def _view(x: torch.Tensor, size: Sequence[Any]) -> torch.Tensor:
    return x.view(size)


def _reshape(x: torch.Tensor, size: Sequence[Any]) -> torch.Tensor:
    return x.reshape(size)


def _expand(x: torch.Tensor, size: Sequence[Any], implicit: bool = False) -> torch.Tensor:
    return x.expand(size)


# ops that read sizes -> their Python forms, which accept the 0-dim tensors the tracer returns for sizes
_SIZE_READERS: MappingProxyType = MappingProxyType({
    aten.view.default: _view,
    aten.reshape.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.expand.default: _expand,
    aten.arange.default: _arange,
    aten.arange.start: _arange,
    aten.arange.start_step: _arange,
    aten.slice.Tensor: _slice,
})


def _diff(x: torch.Tensor, n: int = 1, dim: int = -1, prepend: torch.Tensor | None = None,
          append: torch.Tensor | None = None) -> torch.Tensor:
    """torch.diff by slicing: the TorchScript exporter has no aten::diff (HF attention masks use it)."""
    parts = [t for t in (prepend, x, append) if t is not None]
    x = torch.cat(parts, dim) if len(parts) > 1 else x
    lead = (slice(None),) * (dim % x.dim())
    for _ in range(n):
        x = x[lead + (slice(1, None),)] - x[lead + (slice(None, -1),)]
    return x


def _cumsum(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.cumsum with bool inputs counted as int64 (as torch does): the exporter emits CumSum on bool,
    which ONNX does not define."""
    return torch.cumsum(x.long() if x.dtype == torch.bool else x, dim, dtype=dtype)


# ops the TorchScript exporter cannot export (or exports wrongly) -> Python forms it exports right
_ONNX_FORMS: MappingProxyType = MappingProxyType({aten.diff.default: _diff, aten.cumsum.default: _cumsum})
_SIZE_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv, operator.neg})


def _traced_sizes(gm: fx.GraphModule) -> set[tuple[str, int]]:
    """Make input sizes graph values in the exported model, not the sample's numbers.

    `aten.sym_size(x, d)` runs as a Python int, which the TorchScript tracer bakes in; `x.size(d)` is
    recorded instead (the tracer returns a 0-dim tensor), and the ops reading it get Python forms that
    take such tensors. A size that reaches any other op stays the sample's: its (placeholder, dim) is
    returned, and that axis is exported static rather than wrong at other sizes.
    """
    roots: dict[fx.Node, set[fx.Node]] = {}  # size value -> the sym_size nodes it derives from
    readers: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        sizes = [a for a in node.all_input_nodes if a in roots]
        if node.target == aten.sym_size.int:
            roots[node] = {node}
        elif sizes and node.target in _SIZE_ARITHMETIC:
            roots[node] = set().union(*(roots[a] for a in sizes))
        elif sizes:
            readers.append(node)
    static: set[fx.Node] = set()
    for node in readers:
        if node.target not in _SIZE_READERS and not _takes_tensors_at(node, roots):
            static |= set().union(*(roots[a] for a in node.all_input_nodes if a in roots))
    for node in readers:
        if node.target in _SIZE_READERS and not any(roots[a] & static for a in node.all_input_nodes if a in roots):
            node.target = _SIZE_READERS[node.target]
    for node in [n for n in roots if n.target == aten.sym_size.int and n not in static]:
        with gm.graph.inserting_before(node):
            node.replace_all_uses_with(gm.graph.call_method("size", node.args))
        gm.graph.erase_node(node)
    return {(n.args[0].name, n.args[1]) for n in static}


def _takes_tensors_at(node: fx.Node, sizes: dict[fx.Node, set[fx.Node]]) -> bool:
    """Whether every argument of `node` that holds a size value is a Tensor argument of its schema."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    for arg, value in zip(schema.arguments, node.args):
        if value in sizes and str(arg.type) != "Tensor":
            return False
        if isinstance(value, (list, tuple)) and any(v in sizes for v in value if isinstance(v, fx.Node)):
            return False
    return all(v not in sizes for v in node.kwargs.values() if isinstance(v, fx.Node))


def _fold_adapters(gm: fx.GraphModule) -> None:
    """Replace each adapter call by the op output it adds to, and give the copy W + dW as a new frozen
    parameter."""
    adapters: dict[str, nn.Module] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.target.startswith(f"{ADAPTER_ROOT}."):
            continue
        adapter = gm.get_submodule(node.target)
        adapters[adapter.weight_name] = adapter
        node.replace_all_uses_with(node.args[1])  # the rewrite calls adapter(x, op output)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    with torch.no_grad():
        for name, adapter in adapters.items():
            weight = gm.get_parameter(name)
            delta = adapter.delta_for_weight().reshape(weight.shape)
            owner, _, attr = name.rpartition(".")
            merged = (weight.float() + delta).to(weight.dtype)
            setattr(gm.get_submodule(owner), attr, nn.Parameter(merged, requires_grad=False))


def frozen_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """Eval-mode batch norm as a per-channel scale and shift."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def _hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / 6 + 0.5, 0.0, 1.0)


def _hardswish(x: torch.Tensor) -> torch.Tensor:
    return x * _hardsigmoid(x)


# ops whose ONNX forms ONNX Runtime 1.19 cannot differentiate -> forms of plain arithmetic it can
_DIFFERENTIABLE_FORMS: MappingProxyType = MappingProxyType({
    aten.hardswish.default: _hardswish, aten.hardswish_.default: _hardswish,
    aten.hardsigmoid.default: _hardsigmoid, aten.hardsigmoid_.default: _hardsigmoid,
})


def for_training(gm: fx.GraphModule) -> None:
    """Rewrite what ONNX Runtime's training graph gets wrong or cannot differentiate.

    Eval-form batch norm becomes a per-channel scale and shift: ORT's training graph turns every
    BatchNormalization into its training form (batch statistics) whatever its training_mode says; as
    Mul/Add it uses the running statistics, as the PyTorch model in eval mode does, and they stay
    frozen. HardSwish / HardSigmoid (MobileNetV3) have no gradient in ORT 1.19: they become clamps.
    """
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DIFFERENTIABLE_FORMS:
            node.target = _DIFFERENTIABLE_FORMS[node.target]
        elif node.target == aten.batch_norm.default and not node.args[5]:
            x, weight, bias, mean, var, _training, _momentum, eps = node.args[:8]
            with gm.graph.inserting_before(node):
                frozen = gm.graph.call_function(frozen_batch_norm, (x, weight, bias, mean, var, eps))
            node.replace_all_uses_with(frozen)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


class FlatModel(nn.Module):
    """The graph behind the interface `torch.onnx.export` needs: tensors in positionally (the `slots`
    order; every other input keeps its sample value), a tuple of plain tensors out."""

    def __init__(self, gm: fx.GraphModule, sample: Batch, slots: Sequence[Slot],
                 outputs: Sequence[Callable[[Any], torch.Tensor]]) -> None:
        super().__init__()
        setattr(self, WRAPPER_ROOT, gm)
        self.sample, self.slots, self.outputs = sample, tuple(slots), tuple(outputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = list(self.sample.args), dict(self.sample.kwargs)
        for slot, tensor in zip(self.slots, tensors):
            if isinstance(slot.key, int):
                args[slot.key] = tensor
            else:
                kwargs[slot.key] = tensor
        out = getattr(self, WRAPPER_ROOT)(*args, **kwargs)
        return tuple(pick(out) for pick in self.outputs)


def flat_logits_output(out: Any) -> torch.Tensor:
    """Logits as (N, classes), the form cross-entropy over the last dim takes (as `giva_fx.loss` does)."""
    logits = logits_of(out)
    return logits.reshape(-1, logits.shape[-1])


def loss_output(out: Any) -> torch.Tensor:
    """The model's own loss (HF models given labels)."""
    loss = own_loss(out)
    if loss is None:
        raise ExportError("loss='model' needs a model that returns its own loss (e.g. an HF model given labels "
                          "in the sample batch); pass loss='cross_entropy' or 'mse' instead")
    return loss


def dynamic_axes(gm: fx.GraphModule, sample: Batch, slots: Sequence[Slot]) -> dict[str, dict[int, str]]:
    """`batch` (dim 0) and, for integer inputs (token ids, masks), `sequence` (dim 1), where the
    captured graph keeps them symbolic. Every other dim keeps the sample's size: ONNX Runtime's pooling
    gradients need static spatial sizes, and a model rarely takes others."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    static = gm.meta.get(STATIC_DIMS, set())
    by_key = {slot.key: slot for slot in slots}
    args = tuple(by_key.get(i, "") for i in range(len(sample.args)))  # "" (a pytree leaf): not fed
    kwargs = {k: by_key.get(k, "") for k in sample.kwargs}
    in_spec = getattr(getattr(gm.graph._codegen, "pytree_info", None), "in_spec", None)
    # placeholders follow the capture's flattened (args, kwargs)
    flat = fx_pytree.tree_flatten_spec((args, kwargs), in_spec) if in_spec else [*args, *kwargs.values()]
    axes: dict[str, dict[int, str]] = {}
    for node, slot in zip(placeholders, flat):
        val = node.meta.get("val")
        if not isinstance(slot, Slot) or not isinstance(val, torch.Tensor):
            continue
        integer = not slot.dtype.startswith(("float", "bfloat", "complex"))
        names = ("batch", "sequence") if integer else ("batch",)
        axes[slot.name] = {d: names[d] for d in range(min(len(names), val.dim()))
                           if isinstance(val.shape[d], torch.SymInt) and (node.name, d) not in static}
    return axes


def canonical_names(wrapper: FlatModel) -> dict[str, str]:
    """Exporter initializer name (the wrapper's state-dict key) -> the name giva-fx uses elsewhere:
    the weight's own name for model tensors, `<weight>.lambda_s` / `.lambda_o` / `.A` / `.B` for adapters."""
    gm = getattr(wrapper, WRAPPER_ROOT)
    owners = {f"{ADAPTER_ROOT}.{key}.": adapter.weight_name + "."
              for key, adapter in getattr(gm, ADAPTER_ROOT, nn.Module()).named_children()}
    names = {}
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for name, _ in tensors:
        canonical = name
        for prefix, weight in owners.items():
            if name.startswith(prefix):
                canonical = weight + name[len(prefix):]
                break
        names[f"{WRAPPER_ROOT}.{name}"] = canonical
    return names


def export_onnx(wrapper: FlatModel, adapted: GivaModel, sample: Batch, slots: Sequence[Slot],
                output_names: Sequence[str]) -> onnx_lib.ModelProto:
    """Export `wrapper` with the settings in `EXPORTER`, in memory, initializers renamed canonically."""
    onnx_lib = require("onnx")
    buffer = io.BytesIO()
    tensors = tuple(slot.take(sample) for slot in slots)
    with preserved_state(adapted), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and train/eval-mode notes about the frozen graph
        try:
            torch.onnx.export(wrapper, tensors, buffer, input_names=[s.name for s in slots],
                              output_names=list(output_names),
                              dynamic_axes=dynamic_axes(getattr(wrapper, WRAPPER_ROOT), sample, slots),
                              training=torch.onnx.TrainingMode.TRAINING, **EXPORTER)
        except Exception as exc:  # the exporter raises many types; all mean "cannot export this graph"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export (TorchScript, opset {EXPORTER['opset_version']}) failed on "
                              f"the adapted graph: {first}") from exc
    model = onnx_lib.load_from_string(buffer.getvalue())
    rename(model, canonical_names(wrapper))
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


def rename(model: onnx_lib.ModelProto, mapping: dict[str, str]) -> None:
    """Rename initializers (and every reference to them, in subgraphs too) through `mapping`."""
    def visit(graph: Any) -> None:
        for init in graph.initializer:
            init.name = mapping.get(init.name, init.name)
        for value in (*graph.input, *graph.output, *graph.value_info):
            value.name = mapping.get(value.name, value.name)
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in mapping:
                    node.input[i] = mapping[name]
            for attr in node.attribute:
                for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                    visit(sub)

    visit(model.graph)


def check_vectors(model: onnx_lib.ModelProto, expected: dict[str, tuple[int, ...]]) -> None:
    """Every trainable tensor must be its own initializer, with its shape, read by the graph: anything
    else means the exporter folded, merged or dropped it and it would silently stop training."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    used = {name for node in model.graph.node for name in node.input}
    problems = []
    for name, shape in expected.items():
        if name not in inits:
            problems.append(f"{name} is not an initializer (folded into a constant or merged with another)")
        elif inits[name] != shape:
            problems.append(f"{name} has shape {inits[name]} in the graph, {shape} in the model")
        elif name not in used:
            problems.append(f"{name} is not read by any node")
    if problems:
        raise ExportError("the exported graph does not keep the trainable vectors: " + "; ".join(problems[:5])
                          + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
