"""Conv adapters: every conv flavour keeps the op's output shape and the exact dW; CNNs and hybrid
vision models adapt, merge and train only their vectors; gradient bases help the first step."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import giva_fx
from giva_fx.adapters import ConvAdapter
from giva_fx.passes.rewrite import ADAPTER_ROOT, module_key

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLASSES = 3


# ---------------------------------------------------------------- one conv op, every flavour

@dataclass(frozen=True)
class Flavour:
    conv: type[nn.Module]
    in_ch: int
    out_ch: int
    spatial: tuple[int, ...]
    rank: int
    kwargs: dict[str, Any]


FLAVOURS = {
    "1d": Flavour(nn.Conv1d, 4, 6, (12,), 3, dict(kernel_size=3)),
    "1d_stride2_groups2": Flavour(nn.Conv1d, 4, 8, (13,), 3, dict(kernel_size=5, stride=2, padding=2, groups=2)),
    "2d_same_dilation2": Flavour(nn.Conv2d, 3, 8, (9, 9), 4, dict(kernel_size=3, padding="same", dilation=2)),
    "2d_same_even_kernel": Flavour(nn.Conv2d, 3, 8, (8, 7), 4, dict(kernel_size=4, padding="same")),
    "2d_valid": Flavour(nn.Conv2d, 3, 8, (7, 7), 4, dict(kernel_size=3, padding="valid")),
    "2d_asymmetric_stride": Flavour(nn.Conv2d, 3, 8, (9, 7), 4, dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0))),
    "2d_reflect_padding": Flavour(nn.Conv2d, 3, 8, (7, 7), 4, dict(kernel_size=3, padding=1, padding_mode="reflect")),
    "2d_depthwise_stride2": Flavour(nn.Conv2d, 8, 8, (9, 9), 4, dict(kernel_size=3, stride=2, padding=1, groups=8)),
    "2d_depthwise_multiplier2": Flavour(nn.Conv2d, 4, 8, (7, 7), 2, dict(kernel_size=3, padding=1, groups=4)),
    "2d_groups2": Flavour(nn.Conv2d, 8, 12, (7, 7), 4, dict(kernel_size=3, padding=1, groups=2)),
    "3d_stride2": Flavour(nn.Conv3d, 2, 4, (6, 6, 6), 3, dict(kernel_size=3, stride=2, padding=1)),
    "3d_dilation2_groups2": Flavour(nn.Conv3d, 4, 6, (6, 5, 6), 3, dict(kernel_size=3, dilation=2, padding=2, groups=2)),
}


class OneConv(nn.Module):
    """conv -> tanh -> a linear head over every position, so the gradient has full rank."""

    def __init__(self, f: Flavour) -> None:
        super().__init__()
        self.conv = f.conv(f.in_ch, f.out_ch, **f.kwargs)
        with torch.no_grad():
            out = self.conv(torch.zeros(1, f.in_ch, *f.spatial))
        self.head = nn.Linear(out.numel(), CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.fixture(scope="module", params=list(FLAVOURS))
def one_conv(request):
    f = FLAVOURS[request.param]
    torch.manual_seed(0)
    model = OneConv(f).eval()
    gen = torch.Generator().manual_seed(1)
    sample = (torch.randn(6, f.in_ch, *f.spatial, generator=gen), torch.randint(0, CLASSES, (6,), generator=gen))
    adapted = giva_fx.adapt(model, sample, rank=f.rank, progress=False).eval()
    return f, model, sample, adapted


def _adapter(adapted: giva_fx.GivaModel) -> ConvAdapter:
    return getattr(getattr(adapted.graph_module, ADAPTER_ROOT), module_key("conv.weight"))


def _random_vectors(adapter: ConvAdapter) -> None:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        adapter.lambda_s.copy_(torch.randn(adapter.lambda_s.shape, generator=gen))
        adapter.lambda_o.copy_(torch.randn(adapter.lambda_o.shape, generator=gen))


def _reset_vectors(adapter: ConvAdapter) -> None:
    with torch.no_grad():
        adapter.lambda_s.fill_(1.0)
        adapter.lambda_o.zero_()


def _run_with_hook(module: nn.Module, call) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(inputs, output) of `module` during `call()`."""
    seen: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _reference_conv(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight` applied the way `conv` applies its own; with a non-zero padding mode, `x` is the
    already padded input the aten op receives (torch pads first, then convolves with padding 0)."""
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    padding = conv.padding if conv.padding_mode == "zeros" else 0
    return fn(x, weight, None, conv.stride, padding, conv.dilation, conv.groups)


def test_every_conv_flavour_is_adapted_with_its_own_conv_arguments(one_conv):
    f, model, _, adapted = one_conv
    (op,) = adapted.found.ops
    c = model.conv
    assert op.weight_name == "conv.weight" and op.kind == "conv"
    assert op.in_features == c.in_channels // c.groups * c.weight[0, 0].numel()
    assert (op.conv.stride, op.conv.dilation, op.conv.groups) == (c.stride, c.dilation, c.groups)
    assert op.conv.padding == (c.padding if c.padding_mode == "zeros" else (0,) * op.conv.ndim)


def test_adapter_output_has_the_op_output_shape(one_conv):
    _, model, (x, _), adapted = one_conv
    _, op_out = _run_with_hook(model.conv, lambda: model(x))
    (_, y), out = _run_with_hook(_adapter(adapted), lambda: adapted(x))
    assert y.shape == out.shape == op_out.shape


@pytest.mark.parametrize("form", ["factorized", "dense"])
def test_adapter_forward_equals_a_conv_with_its_delta_weight(one_conv, form):
    _, model, (x, _), adapted = one_conv
    adapter = _adapter(adapted)
    chosen = adapter.dense
    _random_vectors(adapter)
    try:
        adapter.dense = form == "dense"
        (x_in, y), out = _run_with_hook(adapter, lambda: adapted(x))
        dw = adapter.delta_weight()
        assert dw.shape == model.conv.weight.shape
        torch.testing.assert_close(out - y, _reference_conv(model.conv, x_in, dw), rtol=1e-4, atol=1e-5)
    finally:
        adapter.dense = chosen
        _reset_vectors(adapter)


def test_delta_weight_is_diag_lambda_o_B_diag_lambda_s_A_over_patches(one_conv):
    _, model, _, adapted = one_conv
    adapter = _adapter(adapted)
    _random_vectors(adapter)
    try:
        a, b = adapter.A.flatten(1), adapter.B.flatten(1)
        expected = torch.diag(adapter.lambda_o) @ b @ torch.diag(adapter.lambda_s) @ a
        torch.testing.assert_close(adapter.delta_weight().flatten(1), expected.detach())
    finally:
        _reset_vectors(adapter)


def test_merge_adds_what_the_adapter_adds(one_conv):
    _, model, (x, _), adapted = one_conv
    adapter = _adapter(adapted)
    _random_vectors(adapter)
    try:
        with torch.no_grad():
            merged_weight = model.conv.weight + adapter.delta_for_weight()
            expected = torch.func.functional_call(model, {"conv.weight": merged_weight}, (x,))
            torch.testing.assert_close(adapted(x), expected, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(adapted(x), model(x))
    finally:
        _reset_vectors(adapter)


def test_A_spans_the_top_r_right_singular_subspace_of_the_reshaped_gradient(one_conv):
    f, model, (x, y), adapted = one_conv
    weight = model.conv.weight
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), weight)
    _, s, vh = torch.linalg.svd(grad.reshape(weight.shape[0], -1))
    a = _adapter(adapted).A.flatten(1)
    r = a.shape[0]
    assert r == min(f.rank, *grad.reshape(weight.shape[0], -1).shape)
    assert r == len(s) or s[r - 1] > 1.02 * s[r], "no spectral gap: the top-r subspace is ill-defined"
    torch.testing.assert_close(a @ a.T, torch.eye(r), atol=1e-5, rtol=0)
    gap = torch.linalg.matrix_norm(a.T @ a - vh[:r].T @ vh[:r], ord=2)  # sin of the largest principal angle
    assert gap < 1e-3


def test_depthwise_convs_use_the_dense_form_and_wide_ones_the_factorized_form():
    """The cheaper of the two exact forms is chosen per op (multiply-adds per output position)."""
    forms = {}
    for name in ("2d_depthwise_stride2", "2d_groups2", "2d_valid"):
        f = FLAVOURS[name]
        sample = (torch.randn(2, f.in_ch, *f.spatial), torch.randint(0, CLASSES, (2,)))
        forms[name] = _adapter(giva_fx.adapt(OneConv(f), sample, rank=f.rank, init="random", progress=False)).dense
    assert forms == {"2d_depthwise_stride2": True, "2d_groups2": False, "2d_valid": False}


# ---------------------------------------------------------------- selection and skips

class TemporalCNN(nn.Module):
    """A small 1-D CNN over (batch, channels, time): conv/BN stack, grouped dilated conv, MLP head."""

    def __init__(self, channels: int = 4, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv1d(channels, 16, 5, padding=2)
        self.bn = nn.BatchNorm1d(16)
        self.mix = nn.Conv1d(16, 16, 3, dilation=2, padding=2, groups=4)
        self.down = nn.Conv1d(16, 32, 3, stride=2)
        self.hidden = nn.Linear(32, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.mix(h)) + h
        h = F.relu(self.down(h)).mean(-1)
        return self.head(F.relu(self.hidden(h)))


def temporal_cnn() -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    return TemporalCNN(), (torch.randn(4, 4, 24, generator=gen), torch.randint(0, 5, (4,), generator=gen))


@pytest.mark.parametrize("kinds, adapted_names", [
    (("linear",), {"hidden.weight"}),
    (("conv",), {"stem.weight", "mix.weight", "down.weight"}),
    (None, {"hidden.weight", "stem.weight", "mix.weight", "down.weight"}),
])
def test_kinds_selects_op_kinds_and_the_rest_are_listed_as_skipped(kinds, adapted_names):
    model, sample = temporal_cnn()
    kw = {} if kinds is None else {"kinds": kinds}
    s = giva_fx.summary(giva_fx.adapt(model, sample, rank=2, progress=False, **kw))
    assert {r.weight for r in s.ops} == adapted_names
    weights = {"hidden.weight", "stem.weight", "mix.weight", "down.weight"}
    not_selected = {r.weight for r in s.skipped if r.reason.startswith("kind ")}
    assert not_selected & weights == weights - adapted_names
    assert "head.weight" in {r.weight for r in s.skipped}


class Awkward(nn.Module):
    """Convs the adapter does not cover: transposed ones, and a weight shared by convs with
    different arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 6, 3)
        self.w = nn.Parameter(torch.randn(6, 6, 3, 3) / 6)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.plain = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = torch.convolution(h, self.w, None, [1, 1], [1, 1], [1, 1], True, [0, 0], 1)
        h = self.shared(h) + F.conv2d(h, self.shared.weight, padding=2, dilation=2)
        return self.head(self.plain(h).mean((2, 3)))


def test_transposed_and_inconsistently_used_convs_are_skipped_with_a_reason():
    model = Awkward().eval()
    x = torch.randn(2, 3, 6, 6)
    adapted = giva_fx.adapt(model, (x, torch.tensor([0, 1])), rank=2, progress=False).eval()
    reasons = {r.weight: r.reason for r in giva_fx.summary(adapted).skipped}
    assert "transposed" in reasons["up.weight"] and "transposed" in reasons["w"]
    assert "different stride/padding/dilation/groups" in reasons["shared.weight"]
    assert [op.weight_name for op in adapted.found.ops] == ["plain.weight"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- whole models

def timm_model(name: str) -> tuple[nn.Module, Any]:
    import timm

    torch.manual_seed(0)
    extra = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=5, **extra)
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 5, (2,), generator=gen))


MODELS = {name: (lambda name=name: timm_model(name)) for name in
          ("resnet18", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050", "vit_tiny_patch16_224")}
MODELS["temporal_cnn"] = temporal_cnn


@pytest.fixture(scope="module", params=list(MODELS))
def cnn(request):
    model, sample = MODELS[request.param]()
    model.eval()
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False)
    return request.param, model, sample, adapted


def _copies(model: nn.Module, adapted: giva_fx.GivaModel) -> tuple[nn.Module, giva_fx.GivaModel]:
    """Independent copies whose base weights share storage again, as adapt() leaves them."""
    model, adapted = copy.deepcopy(model), copy.deepcopy(adapted)
    for name, p in model.named_parameters(remove_duplicate=False):
        adapted.graph_module.get_parameter(name).data = p.data
    return model, adapted


def test_every_conv_but_heads_is_adapted_including_depthwise(cnn):
    name, model, _, adapted = cnn
    convs = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    adapted_convs = {op.weight_name: op for op in adapted.found.ops if op.kind == "conv"}
    assert set(adapted_convs) == set(convs)
    for w, op in adapted_convs.items():
        assert op.conv.groups == convs[w].groups
    assert any(op.conv.groups > 1 for op in adapted_convs.values()) == any(m.groups > 1 for m in convs.values())
    assert any(op.kind == "linear" for op in adapted.found.ops) == (name in ("vit_tiny_patch16_224", "temporal_cnn"))


def test_at_init_the_adapted_model_equals_the_original_in_eval_and_train_mode(cnn):
    _, model, (x, _), adapted = cnn
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(x), model(x), rtol=0, atol=1e-6)
        model, adapted = _copies(model, adapted)  # train mode updates batch-norm statistics
        torch.testing.assert_close(adapted.train()(x), model.train()(x), rtol=0, atol=1e-6)


def test_only_the_vectors_train_and_merge_reproduces_the_trained_outputs(cnn):
    _, model, (x, y), adapted = cnn
    model, adapted = _copies(model, adapted)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lambda_s", "lambda_o")) for n in trainable)
    assert len(trainable) == len(giva_fx.trainable_parameters(adapted))
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(giva_fx.trainable_parameters(adapted).values(), lr=1e-2)
    adapted.train()
    for _ in range(3):
        F.cross_entropy(adapted(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in adapted.named_parameters() if n in frozen)
    adapted.eval()
    with torch.no_grad():
        trained = adapted(x)
        assert not torch.allclose(trained, model.eval()(x), rtol=0, atol=1e-5)
        assert giva_fx.merge(adapted, model) is model
        torch.testing.assert_close(model(x), trained, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(adapted(x), trained, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- real data: scikit-learn digits

@pytest.fixture(scope="module")
def digits():
    """A small CNN trained on 8x8 digits, and the downstream task: the same digits rotated."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=gen)
    train_idx, test_idx = order[:1200], order[1200:]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        idx = train_idx[torch.randint(0, len(train_idx), (64,), generator=gen)]
        F.cross_entropy(net(images[idx]), labels[idx]).backward()
        opt.step()
        opt.zero_grad()
    rotated = images.flip(-1).transpose(-1, -2)
    return net.eval(), rotated, labels, train_idx, test_idx


def _lambda_o_grad_norm(net: nn.Module, x: torch.Tensor, y: torch.Tensor, init: str) -> float:
    adapted = giva_fx.adapt(net, (x, y), rank=4, init=init, progress=False).eval()
    F.cross_entropy(adapted(x), y).backward()
    grads = [p.grad for n, p in giva_fx.trainable_parameters(adapted).items() if n.endswith("lambda_o")]
    return torch.cat([g.flatten() for g in grads]).norm().item()


def test_gradient_bases_give_conv_adapters_a_larger_first_step_than_random_bases(digits):
    net, images, labels, train_idx, _ = digits
    x, y = images[train_idx[:128]], labels[train_idx[:128]]
    assert _lambda_o_grad_norm(net, x, y, "Vr") > _lambda_o_grad_norm(net, x, y, "random")


def test_fine_tuning_conv_adapters_on_rotated_digits_lowers_the_held_out_loss(digits):
    net, images, labels, train_idx, test_idx = digits
    adapted = giva_fx.adapt(net, (images[train_idx[:128]], labels[train_idx[:128]]), rank=4, progress=False)
    assert {op.kind for op in adapted.found.ops} == {"conv"}

    def held_out_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(adapted.eval()(images[test_idx]), labels[test_idx]).item()

    before = held_out_loss()
    opt = torch.optim.Adam(giva_fx.trainable_parameters(adapted).values(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    adapted.train()
    for _ in range(60):
        idx = train_idx[torch.randint(0, len(train_idx), (64,), generator=gen)]
        F.cross_entropy(adapted(images[idx]), labels[idx]).backward()
        opt.step()
        opt.zero_grad()
    assert held_out_loss() < 0.75 * before
