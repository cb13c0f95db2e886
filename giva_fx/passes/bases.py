"""Bases: a weight gradient -> the frozen bases (A, B) of one adapter.

G (out x in, float32) ~ U S V^T by `torch.svd_lowrank`. A is always r x in, B out x r:

=========  ==========================  ======================================
init       A                           B
=========  ==========================  ======================================
Vr         top-r right singular vecs   random orthonormal (the default)
VrUr       top-r right singular vecs   U[:, :r]
VrU2r      top-r right singular vecs   U[:, r:2r]
VrUrand    top-r right singular vecs   Gaussian, N(0, 1/out)
random     random orthonormal rows     random orthonormal (VeRA-like baseline)
=========  ==========================  ======================================

Randomness comes from a generator seeded by (seed, weight name), never from the global RNG, so
bases do not depend on the order ops are processed, on other code, or on the process (DDP ranks).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from giva_fx.errors import ConfigError, warn

INIT_MODES = ("Vr", "VrUr", "VrU2r", "VrUrand", "random")


@dataclass(frozen=True)
class Bases:
    """Frozen adapter bases for one weight, and how they were obtained."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    init: str  # the mode actually used ("random" after a fallback)
    note: str | None = None  # why the requested mode was not used, if it was not

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def check_init(init: str) -> None:
    if init not in INIT_MODES:
        raise ConfigError(f"unknown init mode {init!r}; choose one of {', '.join(INIT_MODES)}")


def check_rank(rank: object) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank must be a positive int, got {rank!r}")


def check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")


def max_rank(out_features: int, in_features: int, init: str) -> int:
    """The largest rank the shape allows for this init mode (VrU2r needs 2r singular vectors)."""
    limit = min(out_features, in_features)
    return limit // 2 if init == "VrU2r" else limit


def op_seed(seed: int, weight_name: str) -> int:
    """A per-op seed that depends only on the global seed and the weight's name."""
    return (zlib.crc32(weight_name.encode()) * 1_000_003 + seed) % (2**63 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows x cols) matrix with orthonormal columns (rows >= cols), Haar-distributed."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


def clamp_rank(rank: int, out_features: int, in_features: int, init: str, name: str) -> int:
    """`rank`, lowered with a warning that names the op when the shape cannot hold it."""
    limit = max(1, max_rank(out_features, in_features, init))
    if rank > limit:
        warn(f"{name}: rank {rank} clamped to {limit} (weight is {out_features}x{in_features}, init {init})",
             stacklevel=3)
        return limit
    return rank


def random_bases(out_features: int, in_features: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA-like bases: random orthonormal A rows and B columns."""
    g = _generator(seed)
    a = random_orthonormal(in_features, rank, g).T.contiguous()
    b = random_orthonormal(out_features, rank, g)
    return a, b


def seeded_bases(init: str, out_features: int, in_features: int, rank: int, op_seed: int) -> dict[str, torch.Tensor]:
    """The bases of `init` that depend on the per-op seed alone (B for Vr and VrUrand, A and B for
    random): an adapter file may omit them and regenerate them bit for bit."""
    if init == "random":
        a, b = random_bases(out_features, in_features, rank, op_seed)
        return {"A": a, "B": b}
    if init == "Vr":
        return {"B": random_orthonormal(out_features, rank, _generator(op_seed))}
    if init == "VrUrand":
        return {"B": torch.randn(out_features, rank, generator=_generator(op_seed)) / out_features**0.5}
    return {}


def gradient_problem(grad: torch.Tensor | None) -> str | None:
    """Why a gradient cannot define bases (missing, zero, non-finite), or None."""
    if grad is None:
        return "no gradient reached this weight (is it used by the loss?)"
    if not torch.isfinite(grad).all():
        return "the gradient has NaN or inf entries"
    if not grad.any():
        return "the gradient is exactly zero"
    return None


def _canonical_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair (u_i, v_i) so v_i's largest entry is positive. SVD signs are
    arbitrary and flip under tiny changes in summation order (e.g. gradients reduced across
    processes); a fixed convention makes the bases comparable, and G = U S V^T is unchanged."""
    signs = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, v * signs


def compute_bases(
    grad: torch.Tensor | None,
    *,
    out_features: int,
    in_features: int,
    rank: int,
    init: str,
    seed: int,
    name: str,
) -> Bases:
    """Bases for one weight from its (out x in) gradient; falls back to `random` with a warning
    when the gradient is missing, zero or non-finite."""
    check_init(init)
    note = None
    if init == "VrU2r" and max_rank(out_features, in_features, init) == 0:  # a 1-row or 1-column weight
        note = f"VrU2r needs 2 singular vectors but a {out_features}x{in_features} weight has 1; used Vr"
        warn(f"{name}: {note}", stacklevel=2)
        init = "Vr"
    rank = clamp_rank(rank, out_features, in_features, init, name)
    seed = op_seed(seed, name)
    problem = None if init == "random" else gradient_problem(grad)
    if init == "random" or problem is not None:
        if problem is not None:
            warn(f"{name}: {problem}; using random bases instead of {init}", stacklevel=2)
        seeded = seeded_bases("random", out_features, in_features, rank, seed)
        return Bases(seeded["A"], seeded["B"], "random", None if problem is None else f"{problem}; fell back to random")
    g = grad.detach().to(torch.float32).reshape(out_features, in_features)
    q = min(max(4 * rank, 2 * rank if init == "VrU2r" else rank), min(g.shape))
    with torch.random.fork_rng(devices=[g.device] if g.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(g, q=q, niter=4)
    u, v = _canonical_signs(u, v)
    a = v[:, :rank].T.contiguous()
    if init == "VrUr":
        b = u[:, :rank].contiguous()
    elif init == "VrU2r":
        b = u[:, rank:2 * rank].contiguous()
    else:  # Vr, VrUrand: B comes from the seed alone
        b = seeded_bases(init, out_features, in_features, rank, seed)["B"]
    return Bases(a, b, init, note)
