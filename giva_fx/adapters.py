"""The adapter layers: frozen bases A, B and the two trained vectors of GiVA.

    adapter(x, y) = y + lambda_o * B(lambda_s * (A x))        dW = diag(lambda_o) B diag(lambda_s) A

where y is the adapted op's output for x: the adapter adds its delta into it (one fused multiply-add
for linear ops). lambda_s starts at 1 and lambda_o at 0, so an adapted model starts out equal to the
original.

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

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the op's output for `x`) plus the delta."""
        if self.merged:  # dW already lives in the shared base weight; adding it again would double it
            return y
        # lambda_o scales B's rows rather than the (tokens x out) output: the same delta, but autograd
        # keeps only r-wide activations for the backward (BERT-base step peak memory -32%). The layouts
        # give every GEMM, forward and backward, a wide output (MKL runs a tokens x r output 3-4x
        # slower): h = (A x^T)^T is column-major and B's rows enter as (r x out), row-major. addmm adds
        # the delta into y with no separate (tokens x out) tensor. Digits ViT step: -7%.
        h = (self.A @ x.reshape(-1, x.shape[-1]).t()).t() * self.lambda_s
        b = self.B.t().contiguous() * self.lambda_o  # (diag(lambda_o) B)^T
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, b).view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """dW (out x in) in float32, whatever the adapter's dtype."""
        a, b = self.A.float(), self.B.float()
        return (self.lambda_o.float()[:, None] * b * self.lambda_s.float()) @ a

    def delta_for_weight(self) -> torch.Tensor:
        """dW in the stored layout of the adapted weight (transposed for in_out weights)."""
        dw = self.delta_weight()
        return dw.T if self.layout == "in_out" else dw


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvAdapter(nn.Module):
    """GiVA for a conv op: A is a conv with the op's kernel, stride, padding and dilation, B a 1x1 conv.

    The weight (out, in/groups, *k) is read as the (out x in/groups*prod(k)) matrix that maps one
    input patch of a group to the outputs, so A (r x in/groups*prod(k)) is a basis of patches and
    dW = diag(lambda_o) B diag(lambda_s) A has the weight's own shape. With groups > 1 every group
    applies the same A to its own patches and each output channel reads, through B, the r channels
    of its own group (B is a grouped 1x1 conv): dW keeps the block structure a grouped conv needs.

    `forward` runs one of two forms of the same delta, whichever costs fewer multiply-adds per
    output position: factorized, conv_A then conv_B (r * (in * prod(k) + out)), or dense, one
    conv with dW (out * in/groups * prod(k)). Dense wins for depthwise convs, where the factorized
    form would also keep r times the op's output for the backward pass.
    """

    def __init__(self, op: WeightOp, bases: Bases, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        assert op.conv is not None, f"{op.weight_name}: a conv op without ConvArgs"
        out, group_in, *kernel = op.weight_shape
        self.weight_name = op.weight_name
        self.init = bases.init
        self.conv = op.conv
        rank, spatial = bases.rank, (1,) * op.conv.ndim
        self.register_buffer("A", bases.A.reshape(rank, group_in, *kernel).to(device=device, dtype=dtype))
        self.register_buffer("B", bases.B.reshape(out, rank, *spatial).to(device=device, dtype=dtype))
        self.lambda_s = nn.Parameter(torch.ones(rank, device=device, dtype=dtype))
        self.lambda_o = nn.Parameter(torch.zeros(out, device=device, dtype=dtype))
        patch = op.in_features  # in/groups * prod(k)
        self.dense = out * patch < rank * (patch * op.conv.groups + out)  # the form forward runs (see above)
        self.merged = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return _CONV[c.ndim](x, weight, None, c.stride, c.padding, c.dilation, c.groups)

    def _per_channel(self, v: torch.Tensor) -> torch.Tensor:
        """`v` shaped to scale channels of batched and unbatched conv outputs alike."""
        return v.reshape(-1, *(1,) * self.conv.ndim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`y` (the op's output for `x`) plus the delta."""
        if self.merged:  # dW already lives in the shared base weight; adding it again would double it
            return y
        if self.dense:
            return y + self._conv(x, self._delta(x.dtype))
        groups = self.conv.groups
        spatial = (1,) * self.conv.ndim
        h = self._conv(x, self.A.repeat(groups, 1, *spatial)) * self._per_channel(self.lambda_s.repeat(groups))
        # lambda_o scales the output channels of B (the 1x1 conv's weight) rather than the output: the
        # same delta, but autograd keeps no out-wide activation for lambda_o's gradient
        return y + _CONV[self.conv.ndim](h, self.B * self.lambda_o.reshape(-1, 1, *spatial), groups=groups)

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.A.to(dtype).flatten(1), self.B.to(dtype).flatten(1)
        dw = (self.lambda_o.to(dtype)[:, None] * b * self.lambda_s.to(dtype)) @ a
        return dw.reshape(b.shape[0], *self.A.shape[1:])

    def delta_weight(self) -> torch.Tensor:
        """dW (out, in/groups, *kernel) in float32, whatever the adapter's dtype."""
        return self._delta(torch.float32)

    def delta_for_weight(self) -> torch.Tensor:
        """dW as merge adds it to the conv weight (the weight's own shape)."""
        return self.delta_weight()


ADAPTERS: MappingProxyType[str, type[nn.Module]] = MappingProxyType({"linear": LinearAdapter, "conv": ConvAdapter})


def make_adapter(op: WeightOp, bases: Bases, weight: torch.Tensor) -> nn.Module:
    """The adapter for `op`, with buffers and vectors in the weight's dtype and device."""
    return ADAPTERS[op.kind](op, bases, dtype=weight.dtype, device=weight.device)
