"""Rewrite: add an adapter after every node of every matched weight op.

Before::

    %linear = call_function[aten.linear.default](args = (%x, %w, %b))
    %gelu   = call_function[aten.gelu.default](args = (%linear,))

After::

    %linear = call_function[aten.linear.default](args = (%x, %w, %b))           # untouched
    %giva   = call_module[target=giva_adapters.<weight>](args = (%x, %linear))  # linear + delta(x)
    %gelu   = call_function[aten.gelu.default](args = (%giva,))

The adapter takes the op's output and returns it with the delta added, so a linear adapter can add
in the same GEMM that computes the delta. The original op is left as it is, so merging dW into its
weight later changes nothing structural. A weight used by several nodes gets one adapter, called
after each of them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch.fx as fx
from torch import nn

from giva_fx.passes.match import OP_TABLE, WeightOp

ADAPTER_ROOT = "giva_adapters"


def module_key(weight_name: str) -> str:
    """An attribute-safe, readable submodule name for the adapter of `weight_name`."""
    return weight_name.replace(".", "__")


def rewrite(gm: fx.GraphModule, ops: Iterable[WeightOp], adapters: Mapping[str, nn.Module]) -> int:
    """Insert `adapters[weight_name]` after each node of each op; return the number of insertions."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if not hasattr(gm, ADAPTER_ROOT):
        gm.add_module(ADAPTER_ROOT, nn.ModuleDict())
    root: nn.ModuleDict = getattr(gm, ADAPTER_ROOT)
    count = 0
    for op in ops:
        key = module_key(op.weight_name)
        root[key] = adapters[op.weight_name]
        for node_name in op.nodes:
            node = nodes[node_name]
            x = node.args[OP_TABLE[node.target].input_arg]
            with gm.graph.inserting_after(node):
                out = gm.graph.call_module(f"{ADAPTER_ROOT}.{key}", (x, node))
            node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
            count += 1
    gm.graph.lint()
    gm.recompile()
    return count


def adapters_of(gm: fx.GraphModule) -> Iterator[tuple[str, nn.Module]]:
    """(weight name, adapter) for every adapter in a rewritten graph module."""
    root = getattr(gm, ADAPTER_ROOT, None)
    for adapter in (root.values() if root is not None else ()):
        yield adapter.weight_name, adapter
