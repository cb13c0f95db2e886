"""The adapter layers: frozen bases A, B and the two trained vectors of GiVA.

    delta(x) = lambda_o * B(lambda_s * (A x))        dW = diag(lambda_o) B diag(lambda_s) A

lambda_s starts at 1 and lambda_o at 0, so an adapted model starts out equal to the original.
Each adapter knows the weight it adapts (`weight_name`), so files, ONNX initializers and log lines
all speak of that weight. `ADAPTERS` maps an op kind to its adapter class.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from giva_fx.passes.bases import Bases
from giva_fx.passes.match import WeightOp


class LinearAdapter(nn.Module):
    """GiVA for a linear-type op; works on the last dim of its input."""

    def __init__(self, op: WeightOp, bases: Bases, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight_name = op.weight_name
        self.layout = op.layout
        self.init = bases.init
        self.register_buffer("A", bases.A.to(device=device, dtype=dtype))
        self.register_buffer("B", bases.B.to(device=device, dtype=dtype))
        self.lambda_s = nn.Parameter(torch.ones(bases.rank, device=device, dtype=dtype))
        self.lambda_o = nn.Parameter(torch.zeros(op.out_features, device=device, dtype=dtype))
        self.merged = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # dW already lives in the shared base weight; adding it again would double it
            return x.new_zeros(())
        return F.linear(F.linear(x, self.A) * self.lambda_s, self.B) * self.lambda_o

    def delta_weight(self) -> torch.Tensor:
        """dW (out x in) in float32, whatever the adapter's dtype."""
        a, b = self.A.float(), self.B.float()
        return (self.lambda_o.float()[:, None] * b * self.lambda_s.float()) @ a

    def delta_for_weight(self) -> torch.Tensor:
        """dW in the stored layout of the adapted weight (transposed for in_out weights)."""
        dw = self.delta_weight()
        return dw.T if self.layout == "in_out" else dw


ADAPTERS: MappingProxyType[str, type[nn.Module]] = MappingProxyType({"linear": LinearAdapter})


def make_adapter(op: WeightOp, bases: Bases, weight: torch.Tensor) -> nn.Module:
    """The adapter for `op`, with buffers and vectors in the weight's dtype and device."""
    return ADAPTERS[op.kind](op, bases, dtype=weight.dtype, device=weight.device)
