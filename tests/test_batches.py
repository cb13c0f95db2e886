"""Batches: every accepted form of sample data, and clear errors for the rest."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from giva_fx.batches import as_batches
from giva_fx.errors import BatchError


def test_single_forms():
    x, y = torch.randn(4, 3), torch.arange(4)
    (b,) = as_batches(x)
    assert b.args[0] is x and b.kwargs == {} and b.target is None
    (b,) = as_batches({"input_ids": x})
    assert b.args == () and b.kwargs["input_ids"] is x
    (b,) = as_batches((x, y))
    assert b.args[0] is x and b.target is y
    (b,) = as_batches(((x, x), y))
    assert len(b.args) == 2 and b.target is y
    (b,) = as_batches(({"input_ids": x}, y))
    assert b.kwargs["input_ids"] is x and b.target is y


def test_lists_and_dataloaders_are_many_batches():
    data = TensorDataset(torch.randn(10, 3), torch.arange(10))
    batches = as_batches(DataLoader(data, batch_size=4))
    assert [b.args[0].shape[0] for b in batches] == [4, 4, 2]
    assert all(b.target is not None for b in batches)
    assert len(as_batches([torch.randn(2, 3)] * 3)) == 3


@pytest.mark.parametrize("bad,message", [
    ([], "empty"),
    ("text", "not supported"),
    (3, "not supported"),
    ((torch.randn(2), torch.arange(2), torch.arange(2)), "got 3 items"),
    ((torch.randn(2), [1, 2]), "target .* must be a tensor"),
    ([object()], "not supported"),
])
def test_bad_batches_are_refused_with_the_fix(bad, message):
    with pytest.raises(BatchError, match=message):
        as_batches(bad)
