"""Warnings: giva-fx's own point at the user's call, whatever stage raised them deep inside, and
keep obeying the user's filters; warnings of other code keep their own location and count."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import giva_fx
from giva_fx.errors import GivaWarning, warn, warns_at_caller

BATCHES = 3


class Noisy(nn.Module):
    """Ops a rank of 4 does not fit (a: 3x12, b: 5x3), one whose gradient is exactly zero (dead),
    and a warning of the model's own in `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.dead, self.b = nn.Linear(12, 3), nn.Linear(12, 8), nn.Linear(3, 5)

    def forward(self, x: torch.Tensor, **unused: torch.Tensor) -> torch.Tensor:
        warnings.warn("the model's own note")
        return self.b(self.a(x)) + 0 * self.dead(x).sum()


def noisy_loss(output: torch.Tensor, batch: Any) -> torch.Tensor:
    warnings.warn("the loss's own note")
    return F.cross_entropy(output, batch[1])


def _noisy() -> tuple[Noisy, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    return Noisy(), [(torch.randn(8, 12), torch.randint(0, 5, (8,))) for _ in range(BATCHES)]


def _record(call: Callable[[], object], action: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        call()
    return caught


def _where(caught: list[warnings.WarningMessage], text: str) -> list[tuple[str, int]]:
    return [(w.filename, w.lineno) for w in caught if str(w.message) == text]


def test_warnings_raised_while_profiling_point_at_the_line_that_called_adapt():
    model, batches = _noisy()
    call = lambda: giva_fx.adapt(model, batches, rank=4, loss_fn=noisy_loss, progress=False)  # noqa: E731
    ours = [w for w in _record(call, "always") if issubclass(w.category, GivaWarning)]
    expected = {"a.weight": "rank 4 clamped to 3", "b.weight": "rank 4 clamped to 3",
                "dead.weight": "the gradient is exactly zero; using random bases"}
    assert sorted(str(w.message).split(":")[0] for w in ours) == sorted(expected)  # each once
    for w in ours:
        name = str(w.message).split(":")[0]
        assert expected[name] in str(w.message)
        assert (w.filename, w.lineno) == (__file__, call.__code__.co_firstlineno), str(w.message)


def test_warnings_of_the_users_own_code_keep_their_location_and_count():
    model, batches = _noisy()
    reference = _record(lambda: noisy_loss(model(batches[0][0]), batches[0]), "always")
    model_at, loss_at = _where(reference, "the model's own note"), _where(reference, "the loss's own note")
    call = lambda: giva_fx.adapt(model, batches, rank=4, loss_fn=noisy_loss, progress=False)  # noqa: E731

    once = _record(call, "default")
    assert _where(once, "the model's own note") == model_at  # raised during capture
    assert _where(once, "the loss's own note") == loss_at  # raised during profiling
    assert _where(_record(call, "always"), "the loss's own note") == loss_at * BATCHES


def test_a_filter_on_the_category_applies_to_giva_warnings_alone():
    model, batches = _noisy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=GivaWarning)
        giva_fx.adapt(model, batches, rank=4, loss_fn=noisy_loss, progress=False)
    assert not [w for w in caught if issubclass(w.category, GivaWarning)]
    assert {str(w.message) for w in caught} >= {"the model's own note", "the loss's own note"}


def test_giva_warnings_made_errors_still_raise_and_leave_the_model_untouched():
    model, batches = _noisy()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", GivaWarning)  # the model's and loss's own notes stay warnings
        with pytest.raises(GivaWarning, match=r"(clamped to 3|exactly zero)"):
            giva_fx.adapt(model, batches, rank=4, loss_fn=noisy_loss, progress=False)
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_adapter_warnings_point_at_the_line_that_called_it(tmp_path):
    model, batches = _noisy()
    sample = {"x": batches[0][0], "atention_mask": torch.ones(8)}  # a name forward() swallows unread
    loss = lambda output, batch: output.square().mean()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        giva_fx.save_adapter(giva_fx.adapt(model, sample, rank=2, loss_fn=loss, progress=False),
                             tmp_path / "a.safetensors")
    call = lambda: giva_fx.load_adapter(model, tmp_path / "a.safetensors", sample)  # noqa: E731
    ours = [w for w in _record(call, "always") if issubclass(w.category, GivaWarning)]
    assert [str(w.message).split(":")[0] for w in ours] == ["Noisy ignores batch input(s) ['atention_mask']"]
    assert (ours[0].filename, ours[0].lineno) == (__file__, call.__code__.co_firstlineno)


@warns_at_caller
def _warns_then(outcome: BaseException | None, *, nested: bool = False) -> None:
    if nested:
        _warns_then(outcome)
        return
    warn("held for the caller")
    if outcome is not None:
        raise outcome


def test_held_warnings_are_issued_when_the_call_fails_and_the_failure_stays_the_error():
    call = lambda: _warns_then(ValueError("the call failed"))  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="the call failed"):
            call()
    assert _where(caught, "held for the caller") == [(__file__, call.__code__.co_firstlineno)]

    with warnings.catch_warnings():
        warnings.simplefilter("error", GivaWarning)
        with pytest.raises(ValueError, match="the call failed") as failed:
            call()
    assert failed.value.__notes__ == ["GivaWarning: held for the caller"]


def test_nested_calls_issue_each_warning_once_at_the_outermost_caller():
    call = lambda: _warns_then(None, nested=True)  # noqa: E731
    assert _where(_record(call, "always"), "held for the caller") == [(__file__, call.__code__.co_firstlineno)]


def test_outside_a_held_call_warn_points_where_its_stacklevel_says():
    def library_function() -> None:
        warn("direct", stacklevel=2)

    caller = lambda: library_function()  # noqa: E731
    assert _where(_record(caller, "always"), "direct") == [(__file__, caller.__code__.co_firstlineno)]
