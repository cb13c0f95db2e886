"""Recompute: a copy of the captured graph that keeps only block inputs alive for the backward.

Profiling runs one forward and backward over the whole sample batch; without care its activations
dominate `adapt()`'s peak memory (on a BERT-base-sized encoder, 4 x 128 tokens, they are 3/4 of
it). The exported graph still knows which module each node came from (`nn_module_stack`), so the
repeated blocks of a model (`encoder.layer.3`, `blocks.7`, `layer2.1`, ...) can be cut out of it
as sub-graphs and run under non-reentrant activation checkpointing: the forward keeps each
block's inputs, and the backward recomputes one block at a time. That costs about one more
forward pass and leaves every gradient unchanged (same ops, same order).

A block is the innermost numbered module holding at least two of the profiled weights; nodes in
no such block (embeddings, heads, masks) run as they are. The copy is made from the eval form of
the graph, without batch norm's step counters (which add 0 there), so recomputation writes nothing.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from giva_fx.passes.mode import is_eval_noop, written_inputs

MIN_WEIGHTS_PER_BLOCK = 2


class Recomputed(nn.Module):
    """One block's sub-graph, run under activation checkpointing."""

    def __init__(self, block: fx.GraphModule) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: object) -> object:
        return checkpoint(self.block, *args, use_reentrant=False)


def _blocks(names: Sequence[str]) -> set[str]:
    """Numbered module paths holding at least `MIN_WEIGHTS_PER_BLOCK` of the weights `names`."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                prefix = ".".join(parts[:i + 1])
                counts[prefix] = counts.get(prefix, 0) + 1
    return {prefix for prefix, n in counts.items() if n >= MIN_WEIGHTS_PER_BLOCK}


def _block_of(node: fx.Node, blocks: set[str]) -> str | None:
    """The innermost block that `node` was traced in, if any."""
    stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
    for path, _ in reversed(list((stack or {}).values())):
        if path in blocks:
            return path
    return None


def _segments(graph: fx.Graph, blocks: set[str]) -> list[list[fx.Node]]:
    """Maximal runs of consecutive nodes from the same block. `get_attr` nodes (weights) have no
    inputs, so they neither join nor break a run: they stay in the outer graph as block inputs. A
    node that writes in place to anything made outside its run (a block input, a buffer) stays
    outside too, since recomputing the run would read the written value."""
    runs: list[list[fx.Node]] = []
    inside: set[fx.Node] = set()  # the nodes of the current run
    current: str | None = None
    for node in graph.nodes:
        if node.op == "get_attr":
            continue
        key = _block_of(node, blocks)
        if key != current:
            inside = set()
        if key is not None and any(v not in inside for v in written_inputs(node, as_trained=False)):
            key, inside = None, set()
        if key is not None:
            if key != current:
                runs.append([])
            runs[-1].append(node)
            inside.add(node)
        current = key
    return runs


def _outline(gm: fx.GraphModule, segment: list[fx.Node], index: int) -> None:
    """Replace `segment` in `gm.graph` by one call of a `Recomputed` sub-graph."""
    inside = set(segment)
    inputs = list(dict.fromkeys(i for n in segment for i in n.all_input_nodes if i not in inside))
    outputs = [n for n in segment if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env = {i: sub.placeholder(f"in_{k}") for k, i in enumerate(inputs)}
    for n in segment:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    name = f"giva_recomputed_{index}"
    gm.add_submodule(name, Recomputed(fx.GraphModule(nn.Module(), sub)))
    with gm.graph.inserting_after(segment[-1]):
        call = gm.graph.call_module(name, tuple(inputs))
    anchor = call
    for k, out in enumerate(outputs):
        with gm.graph.inserting_after(anchor):
            anchor = gm.graph.call_function(operator.getitem, (call, k))
        out.replace_all_uses_with(anchor, delete_user_cb=lambda user: user not in inside)
    for n in reversed(segment):
        gm.graph.erase_node(n)


def recomputed(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A copy of `gm` (same parameters and buffers, not copied) whose blocks holding the weights
    `names` recompute their activations in the backward; `gm` itself is not changed."""
    copied = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    for node in [n for n in copied.graph.nodes if is_eval_noop(n)]:
        node.replace_all_uses_with(node.args[0])
        copied.graph.erase_node(node)
    blocks = _blocks(names)
    segments = [s for s in _segments(copied.graph, blocks) if len(s) > 1]
    for index, segment in enumerate(segments):
        _outline(copied, segment, index)
    copied.graph.lint()
    copied.recompile()
    return copied

