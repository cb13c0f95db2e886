"""`giva_fx.export.onnx`: an inference ONNX model of the adapted model, merged or with its adapters.

Merged, dW is folded into a copy of each adapted weight: the graph is the base model's, same size, same
speed. Unmerged, each adapter stays a subgraph and its lambdas are named initializers
(`<weight>.lambda_s` / `.lambda_o`), e.g. to swap in other trained vectors without re-exporting.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from giva_fx.batches import as_batch
from giva_fx.files import atomic_file
from giva_fx.export._graph import FlatModel, check_vectors, eval_graph, export_onnx, input_slots, require
from giva_fx.loss import logits_of
from giva_fx.model import GivaModel
from giva_fx.trainable import adapter_vectors


def onnx(adapted: GivaModel, sample: Any, path: str | os.PathLike, *, merged: bool = True) -> Path:
    """Write an inference ONNX model of `adapted` to `path` (atomically) and return the path.

    Neither `adapted` nor the user's model is modified. The model takes the sample's tensor inputs
    (keywords by name, e.g. `input_ids`; a positional one as `input`), without `labels`, with dynamic
    batch (and, for token inputs, sequence) axes, and returns `logits`. Dropout is off and batch norm
    uses its running statistics.

    Args:
        adapted: the model `giva_fx.adapt` returned.
        sample: one batch in any form `adapt` takes (it fixes the input names and fills inputs not
            exported, such as `labels`).
        path: the .onnx file to write.
        merged: fold dW into the weights (True) or keep the adapters as subgraphs (False).
    """
    batch = as_batch(sample)
    slots = input_slots(batch, skip=("labels",))
    gm = eval_graph(adapted, batch, merged=merged)
    wrapper = FlatModel(gm, batch, slots, (logits_of,))
    model = export_onnx(wrapper, adapted, batch, slots, ("logits",))
    if not merged:
        check_vectors(model, {n: tuple(p.shape) for n, p in adapter_vectors(adapted).items()})
    with atomic_file(path) as tmp:
        require("onnx").save(model, tmp)
    return Path(path)
