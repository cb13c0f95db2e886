"""The one place that names what trains: adapter vectors and `train=` parameters.

Save, ONNX export and ONNX Runtime artifacts all use these names, so an adapter file, an ONNX
initializer and a log line say the same thing, e.g. ``bert.encoder.layer.0.attention.self.query.weight.lambda_o``.
"""
from __future__ import annotations

from torch import nn

from giva_fx.model import GivaModel

VECTORS = ("lambda_s", "lambda_o")


def adapter_vectors(adapted: GivaModel) -> dict[str, nn.Parameter]:
    """`<weight name>.lambda_s` / `.lambda_o` -> the adapter's Parameter, in graph order."""
    return {f"{name}.{v}": getattr(adapter, v) for name, adapter in adapted.adapters().items() for v in VECTORS}


def full_parameters(adapted: GivaModel) -> dict[str, nn.Parameter]:
    """Parameters trained in full (`train=` patterns), by their qualified name in the model."""
    return {n: adapted.graph_module.get_parameter(n) for n in adapted.full_train}


def trainable_parameters(adapted: GivaModel) -> dict[str, nn.Parameter]:
    """Everything that trains: adapter vectors, then `train=` parameters."""
    return {**adapter_vectors(adapted), **full_parameters(adapted)}
