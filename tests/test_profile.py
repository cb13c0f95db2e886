"""Profile: gradients of the matched weights only, averaged over batches, handed off one by one."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from giva_fx.batches import as_batches
from giva_fx.capture import capture
from giva_fx.passes.profile import profile
from tests.models import functional_mlp


def test_gradients_average_over_batches_and_only_matched_weights_get_them():
    model, _ = functional_mlp()
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(3)]
    gm = capture(model, as_batches(batches)[0]).graph_module
    got: dict[str, torch.Tensor] = {}
    losses = profile(gm, as_batches(batches), ["w1", "w2"], lambda n, g: got.__setitem__(n, g.clone()),
                     progress=False)
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), [model.w1, model.w2])
        for n, g in zip(["w1", "w2"], grads):
            expected[n] += g / len(batches)
    assert sorted(got) == ["w1", "w2"] and len(losses) == 3
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None and not p.requires_grad for p in gm.parameters())


def test_each_gradient_is_dropped_once_delivered_so_memory_holds_about_one():
    model, sample = functional_mlp()
    gm = capture(model, as_batches(sample)[0]).graph_module
    live: list[int] = []

    def sink(name, grad):
        live.append(sum(p.grad is not None for p in gm.parameters()))

    profile(gm, as_batches(sample), ["w1", "w2", "head"], sink, progress=False)
    assert live == [1, 1, 1]


def test_a_weight_the_loss_does_not_reach_is_delivered_as_none():
    model, sample = functional_mlp()
    gm = capture(model, as_batches(sample)[0]).graph_module
    got = {}
    profile(gm, as_batches(sample), ["w1"], got.__setitem__, progress=False,
            loss_fn=lambda out, batch: (out * 0).sum().detach() + 1.0)
    assert got == {"w1": None}
