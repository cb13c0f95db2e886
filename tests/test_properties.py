"""Properties over random small shapes, ranks and init modes (hypothesis): an adapter adds to the
op's output its delta_weight applied as the op would apply it, with the gradients of that sum, ranks
clamp to what the shape holds, A has orthonormal rows, and merge / unmerge round-trip."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import giva_fx
from giva_fx.adapters import make_adapter
from giva_fx.passes.bases import INIT_MODES, compute_bases, max_rank
from giva_fx.passes.match import ConvArgs, WeightOp

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONV = {1: F.conv1d, 2: F.conv2d}

dims = st.integers(1, 20)
ranks = st.integers(1, 24)
inits = st.sampled_from(INIT_MODES)
seeds = st.integers(0, 2**31 - 1)


def adapter_for(op: WeightOp, rank: int, init: str, seed: int) -> nn.Module:
    """An adapter with bases from a random gradient and random (trained-looking) vectors."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(op.out_features, op.in_features, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank clamping warns; the clamp is checked below
        bases = compute_bases(grad, out_features=op.out_features, in_features=op.in_features, rank=rank,
                              init=init, seed=seed, name=op.weight_name)
    adapter = make_adapter(op, bases, torch.empty(op.weight_shape))
    with torch.no_grad():
        adapter.lambda_s.copy_(torch.randn(adapter.lambda_s.shape, generator=gen))
        adapter.lambda_o.copy_(torch.randn(adapter.lambda_o.shape, generator=gen))
    return adapter


def check_rank_and_orthonormal_rows(adapter: nn.Module, op: WeightOp, rank: int, init: str) -> None:
    expected = min(rank, max(1, max_rank(op.out_features, op.in_features, init)))
    assert adapter.rank == expected
    a = adapter.A.reshape(expected, -1)
    assert a.shape == (expected, op.in_features)
    assert adapter.B.reshape(op.out_features, -1).shape == (op.out_features, expected)
    torch.testing.assert_close(a @ a.T, torch.eye(expected), atol=1e-4, rtol=0)


@SETTINGS
@given(out=dims, inp=dims, rank=ranks, init=inits, seed=seeds, transposed=st.booleans())
@example(out=1, inp=5, rank=3, init="VrU2r", seed=0, transposed=False)  # VrU2r on a 1-row weight: falls back to Vr
def test_linear_adapter_forward_is_its_delta_weight(out, inp, rank, init, seed, transposed):
    layout, shape = ("in_out", (inp, out)) if transposed else ("out_in", (out, inp))
    op = WeightOp("layer.weight", "linear", layout, ("n",), shape, out, inp)
    adapter = adapter_for(op, rank, init, seed)
    check_rank_and_orthonormal_rows(adapter, op, rank, init)
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(3, 2, inp, generator=gen), torch.randn(3, 2, out, generator=gen)  # y: the op's output
    dw = adapter.delta_weight()
    torch.testing.assert_close(adapter(x, y), y + x @ dw.T, atol=1e-5, rtol=1e-4)
    # the stored-layout delta is what merge adds to the weight: x @ W (in_out) or x @ W.T (out_in)
    stored = adapter.delta_for_weight()
    assert stored.shape == shape
    torch.testing.assert_close(x @ stored if transposed else x @ stored.T, x @ dw.T)


def formula_delta_weight(adapter: nn.Module) -> torch.Tensor:
    """diag(lambda_o) B diag(lambda_s) A from the adapter's tensors, differentiable in both vectors."""
    a, b = adapter.A.flatten(1), adapter.B.flatten(1)
    dw = torch.diag(adapter.lambda_o) @ b @ torch.diag(adapter.lambda_s) @ a
    return dw.reshape(adapter.B.shape[0], *adapter.A.shape[1:])


def assert_same_gradients(adapter: nn.Module, x: torch.Tensor, y: torch.Tensor, reference) -> None:
    """adapter(x, y) and reference(x, y) pass the same gradients to x, y and both vectors."""
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    wrt = (x, y, adapter.lambda_s, adapter.lambda_o)
    got = torch.autograd.grad((adapter(x, y) * grad_out).sum(), wrt)
    expected = torch.autograd.grad((reference(x, y) * grad_out).sum(), wrt)
    for name, g, e in zip(("x", "y", "lambda_s", "lambda_o"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"d/d{name}: {m}")


@SETTINGS
@given(out=dims, inp=dims, rank=ranks, init=inits, seed=seeds, contiguous=st.booleans())
def test_linear_adapter_gradients_are_those_of_its_delta_weight(out, inp, rank, init, seed, contiguous):
    op = WeightOp("layer.weight", "linear", "out_in", ("n",), (out, inp), out, inp)
    adapter = adapter_for(op, rank, init, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(3, 2, inp, generator=gen)
    x = x if contiguous else x.transpose(0, 1)  # e.g. an input that was permuted before the op
    y = torch.randn(*x.shape[:-1], out, generator=gen)
    assert_same_gradients(adapter, x, y, lambda x, y: y + x @ formula_delta_weight(adapter).T)


@SETTINGS
@given(ndim=st.sampled_from([1, 2]), groups=st.integers(1, 3), in_g=st.integers(1, 3), out_g=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), rank=st.integers(1, 12), init=inits, seed=seeds)
def test_conv_adapter_gradients_are_those_of_its_delta_weight(ndim, groups, in_g, out_g, kernel, stride, rank,
                                                              init, seed):
    out = groups * out_g
    conv = ConvArgs(ndim, (stride,) * ndim, (1,) * ndim, (1,) * ndim, groups)
    weight_op = WeightOp("conv.weight", "conv", "conv", ("n",), (out, in_g, *(kernel,) * ndim), out,
                         in_g * kernel**ndim, conv)
    adapter = adapter_for(weight_op, rank, init, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, groups * in_g, *(6,) * ndim, generator=gen)

    def op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return CONV[ndim](x, weight, None, conv.stride, conv.padding, conv.dilation, groups)

    y = torch.randn(op(x, torch.zeros(weight_op.weight_shape)).shape, generator=gen)  # the op's output
    for dense in (False, True):
        adapter.dense = dense
        assert_same_gradients(adapter, x, y, lambda x, y: y + op(x, formula_delta_weight(adapter)))


@SETTINGS
@given(ndim=st.sampled_from([1, 2]), groups=st.integers(1, 3), in_g=st.integers(1, 3), out_g=st.integers(1, 3),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1), dilation=st.integers(1, 2),
       rank=st.integers(1, 12), init=inits, seed=seeds)
def test_conv_adapter_forward_is_its_delta_weight_as_a_conv(ndim, groups, in_g, out_g, kernel, stride, padding,
                                                            dilation, rank, init, seed):
    out = groups * out_g
    conv = ConvArgs(ndim, (stride,) * ndim, (padding,) * ndim, (dilation,) * ndim, groups)
    op = WeightOp("conv.weight", "conv", "conv", ("n",), (out, in_g, *(kernel,) * ndim), out,
                  in_g * kernel**ndim, conv)
    adapter = adapter_for(op, rank, init, seed)
    check_rank_and_orthonormal_rows(adapter, op, rank, init)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, groups * in_g, *(7,) * ndim, generator=gen)
    dw = adapter.delta_weight()
    assert dw.shape == op.weight_shape
    delta = CONV[ndim](x, dw, None, conv.stride, conv.padding, conv.dilation, groups)
    y = torch.randn(delta.shape, generator=gen)  # the op's output
    for dense in (False, True):  # both forms the adapter may pick compute the same delta
        adapter.dense = dense
        torch.testing.assert_close(adapter(x, y), y + delta, atol=1e-5, rtol=1e-4)


@SETTINGS
@given(d_in=dims, hidden=dims, d_out=st.integers(2, 6), rank=ranks, init=inits, seed=seeds)
def test_merge_reproduces_the_adapted_outputs_and_unmerge_restores_the_weights(d_in, hidden, d_out, rank, init,
                                                                              seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).eval()
    x, y = torch.randn(6, d_in), torch.randint(0, d_out, (6,))
    original = {n: t.clone() for n, t in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = giva_fx.adapt(model, (x, y), rank=rank, init=init, targets=["*"], seed=seed, progress=False)
    adapted.eval()
    assert len(adapted.adapters()) == 2
    with torch.no_grad():
        for p in giva_fx.trainable_parameters(adapted).values():
            p.copy_(torch.randn_like(p))
        expected = adapted(x)
        giva_fx.merge(adapted, model)
        torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(adapted(x), expected, atol=1e-4, rtol=1e-4)  # dW not counted twice
        giva_fx.unmerge(adapted, model)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(value, original[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-5)
