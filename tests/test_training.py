"""Training an adapted model on a real task (scikit-learn's bundled digits) lowers its loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import giva_fx


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return (x - x.mean()) / x.std(), torch.tensor(data.target)


def test_adapter_vectors_alone_fit_digits_on_a_frozen_base():
    torch.manual_seed(0)
    x, y = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))
    adapted = giva_fx.adapt(model, (x[:256], y[:256]), rank=8, targets=["*.weight"], progress=False).train()
    opt = torch.optim.AdamW(giva_fx.trainable_parameters(adapted).values(), lr=5e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = F.cross_entropy(adapted(x), y).item()
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(adapted(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    adapted.eval()
    with torch.no_grad():
        after = F.cross_entropy(adapted(x), y).item()
        accuracy = (adapted(x).argmax(-1) == y).float().mean().item()
    assert after < 0.5 * before
    assert accuracy > 0.6  # chance is 0.1; only 3 * 8 + 128 + 128 + 10 numbers were trained
