"""Bases: A spans the gradient's top-r right singular subspace; B follows the init mode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import giva_fx
from giva_fx.passes.bases import INIT_MODES, compute_bases, max_rank
from tests.models import functional_mlp


def true_gradient(model, sample, name: str) -> torch.Tensor:
    """dL/dW by plain autograd on the original model: the independent reference."""
    model.eval()
    model.zero_grad()
    F.cross_entropy(model(sample[0]), sample[1]).backward()
    grad = dict(model.named_parameters())[name].grad.clone()
    model.zero_grad()
    return grad


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of a and b (both orthonormal rows)."""
    return torch.linalg.svdvals(a @ b.T)


@pytest.fixture(scope="module")
def mlp():
    return functional_mlp(batch=32)


@pytest.mark.parametrize("name", ["w1", "w2"])
def test_a_spans_the_top_singular_subspace_of_the_exact_gradient(mlp, name):
    model, sample = mlp
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False)
    u, s, vh = torch.linalg.svd(true_gradient(model, sample, name))
    assert s[3] > 1.05 * s[4]  # a well-separated subspace, so the comparison is meaningful
    cos = principal_cosines(adapted.adapters()[name].A.double(), vh[:4].double())
    torch.testing.assert_close(cos, torch.ones(4, dtype=torch.double), atol=1e-4, rtol=0)


def test_vr_b_is_orthonormal_and_ur_modes_use_the_left_vectors(mlp):
    model, sample = mlp
    g = true_gradient(model, sample, "w2")
    u, _, _ = torch.linalg.svd(g)
    kw = dict(out_features=24, in_features=24, rank=4, seed=0, name="w2")
    b = compute_bases(g, init="Vr", **kw).B
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    for init, cols in [("VrUr", slice(0, 4)), ("VrU2r", slice(4, 8))]:
        got = compute_bases(g, init=init, **kw).B
        torch.testing.assert_close(principal_cosines(got.T, u[:, cols].T), torch.ones(4), atol=1e-4, rtol=0)


def test_bases_are_deterministic_for_a_seed_and_differ_across_seeds():
    g = torch.randn(40, 30)
    kw = dict(out_features=40, in_features=30, rank=5, name="layer.weight")
    for init in INIT_MODES:
        a = compute_bases(g, init=init, seed=3, **kw)
        torch.manual_seed(123)  # the global RNG must not matter
        b = compute_bases(g, init=init, seed=3, **kw)
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B), init
    assert not torch.equal(compute_bases(g, init="Vr", seed=3, **kw).B, compute_bases(g, init="Vr", seed=4, **kw).B)


def test_rank_is_clamped_with_a_warning_that_names_the_op():
    with pytest.warns(UserWarning, match="narrow.weight: rank 16 clamped to 6"):
        bases = compute_bases(torch.randn(6, 20), out_features=6, in_features=20, rank=16, init="Vr",
                              seed=0, name="narrow.weight")
    assert bases.A.shape == (6, 20) and bases.B.shape == (6, 6)
    assert max_rank(6, 20, "VrU2r") == 3


@pytest.mark.parametrize("grad,why", [(torch.zeros(8, 8), "exactly zero"),
                                      (torch.full((8, 8), float("nan")), "NaN"),
                                      (None, "no gradient")])
def test_degenerate_gradients_fall_back_to_random_with_a_warning(grad, why):
    with pytest.warns(UserWarning, match=f"w: .*{why}.*random"):
        bases = compute_bases(grad, out_features=8, in_features=8, rank=2, init="Vr", seed=0, name="w")
    assert bases.init == "random" and why.lower() in bases.note.lower()
    assert torch.isfinite(bases.A).all() and torch.isfinite(bases.B).all()


def test_singular_vector_signs_follow_one_convention():
    """A sign-flipped gradient estimate (same subspace) gives bit-for-bit the same A."""
    g = torch.randn(30, 20, dtype=torch.float64).float()
    kw = dict(out_features=30, in_features=20, rank=4, init="VrUr", seed=0, name="w")
    a, b = compute_bases(g, **kw), compute_bases(-g, **kw)
    rows = a.A.abs().argmax(1)
    assert (a.A.gather(1, rows[:, None]) > 0).all()
    torch.testing.assert_close(a.A, b.A, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.B, -b.B, rtol=0, atol=1e-6)  # G = U S V^T: U flips with G
