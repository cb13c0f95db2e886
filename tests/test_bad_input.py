"""Bad input: every mistake gets a giva_fx error that names the problem and the fix, and the
user's model comes back exactly as it was (values, requires_grad flags, train/eval modes).

`CATALOGUE` is the list the README's reliability section counts.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import giva_fx
from giva_fx.errors import BatchError, CaptureError, ConfigError, GivaError, LossError, MatchError
from tests.models import FunctionalMLP, bert, functional_mlp


class Snapshot:
    """Everything about a model that adapt() must not change."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        self.tensors = {n: self._copy(t) for n, t in
                        [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]}
        self.config = dict(vars(model.config)) if hasattr(model, "config") else None

    @staticmethod
    def _copy(t: torch.Tensor) -> tuple[tuple[Any, ...], torch.Tensor | None]:
        """(shape, dtype, device, requires_grad) and a copy of the values (none on the meta device)."""
        return (t.shape, t.dtype, t.device.type), None if t.device.type == "meta" else t.detach().clone()

    def assert_unchanged(self, model: nn.Module) -> None:
        assert {n: m.training for n, m in model.named_modules()} == self.modes
        assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} == self.flags
        now = dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers()])
        assert now.keys() == self.tensors.keys()
        for name, (facts, values) in self.tensors.items():
            assert (now[name].shape, now[name].dtype, now[name].device.type) == facts, name
            if values is not None:
                torch.testing.assert_close(now[name].detach(), values, rtol=0, atol=0, equal_nan=True, msg=name)
        assert (dict(vars(model.config)) if hasattr(model, "config") else None) == self.config
        assert all(p.grad is None for p in model.parameters())


class Branchy(nn.Module):
    """Branches on a tensor value: export cannot capture that."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class IntegerOnly(nn.Module):
    """A lookup-table model: its only weight op multiplies by a frozen integer matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.arange(12).reshape(4, 3), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.table


class NoWeightOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.embed(ids)).sum(1)


def mlp() -> tuple[nn.Module, Any]:
    model, sample = functional_mlp()
    model.w1.requires_grad_(False)  # a user's own frozen parameter must stay frozen
    return model.eval(), sample


def meta_mlp() -> tuple[nn.Module, Any]:
    with torch.device("meta"):
        model = FunctionalMLP()
    return model, functional_mlp()[1]


def nan_mlp() -> tuple[nn.Module, Any]:
    model, sample = mlp()
    with torch.no_grad():
        model.w2[0, 0] = float("nan")
    return model, sample


def per_sample_loss(out: Any, batch: Any) -> torch.Tensor:
    return F.cross_entropy(out, batch[1], reduction="none")


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[nn.Module, Any]]
    call: Callable[[nn.Module, Any], Any]  # (model, its sample) -> adapt(...)
    error: type[GivaError]
    match: str


def adapt(**kw: Any) -> Callable[[nn.Module, Any], Any]:
    """adapt() on the model's own sample, with these options."""
    return lambda model, sample: giva_fx.adapt(model, sample, progress=False, **kw)


def with_batches(fn: Callable[[Any], Any], **kw: Any) -> Callable[[nn.Module, Any], Any]:
    """adapt() on batches derived from the model's own sample."""
    return lambda model, sample: giva_fx.adapt(model, fn(sample), progress=False, **kw)


BERT_IDS = ("input_ids", "attention_mask")
CATALOGUE: dict[str, Case] = {
    # capture
    "untraceable model (branch on a tensor value)": Case(
        lambda: (Branchy(), (torch.randn(2, 4), torch.tensor([0, 1]))), adapt(), CaptureError,
        r"could not capture Branchy at .*test_bad_input.py:\d+ \(if x.sum\(\) > 0:\).*Branchy.forward\(x\); "
        r"the batch gave 1 positional input"),
    "batch of the wrong shape": Case(
        mlp, with_batches(lambda s: (torch.randn(8, 7), s[1])), CaptureError,
        r"could not capture FunctionalMLP at .*models.py:\d+ .*reduction dim.*FunctionalMLP.forward\(x\)"),
    "model on the meta device": Case(meta_mlp, adapt(), CaptureError, "'w1' is on the meta device.*to_empty"),
    "not an nn.Module": Case(lambda: (nn.Linear(3, 3), None), lambda m, s: giva_fx.adapt(F.relu, torch.ones(3)),
                             CaptureError, "expected a torch.nn.Module, got function"),
    # batches
    "batch of the wrong dtype": Case(
        mlp, with_batches(lambda s: (s[0].long(), s[1])), BatchError,
        "the model failed on sample batch 0: .*same dtype"),
    "token ids outside the vocabulary": Case(
        bert, with_batches(lambda s: {**s, "input_ids": s["input_ids"] + 1000}), BatchError,
        "failed on sample batch 0: index out of range.*token ids within the vocabulary"),
    "numpy array as inputs": Case(mlp, with_batches(lambda s: (s[0].numpy(), s[1])), BatchError,
                                  "inputs of type ndarray are not supported; pass a tensor"),
    "string as the batch": Case(mlp, with_batches(lambda s: "a sentence"), BatchError,
                                "batches of type str are not supported"),
    "None as the batch": Case(mlp, with_batches(lambda s: None), BatchError, "batches of type NoneType"),
    "empty list of batches": Case(mlp, with_batches(lambda s: []), BatchError, "list of sample batches is empty"),
    "batch without any tensor": Case(mlp, with_batches(lambda s: {"x": [1.0, 2.0]}), BatchError,
                                     "holds no tensor input"),
    "tuple batch with three items": Case(mlp, with_batches(lambda s: (s[0], s[1], s[1])), BatchError,
                                         r"must be \(inputs,\) or \(inputs, target\), got 3 items"),
    "non-tensor target": Case(mlp, with_batches(lambda s: (s[0], s[1].tolist())), BatchError,
                              "target of an .* batch must be a tensor, got list"),
    "batches of different structures": Case(
        mlp, with_batches(lambda s: [s, ((s[0], s[0]), s[1])]), BatchError,
        r"batch 1 has inputs \(2, \(\)\), unlike batch 0 \(1, \(\)\)"),
    # loss
    "no labels and no loss_fn": Case(mlp, with_batches(lambda s: s[0]), LossError,
                                     "cannot derive a loss.*pass loss_fn="),
    "HF batch without labels": Case(bert, with_batches(lambda s: {k: s[k] for k in BERT_IDS}), LossError,
                                    "cannot derive a loss"),
    "loss_fn returns a vector": Case(mlp, adapt(loss_fn=per_sample_loss), LossError,
                                     r"must be a scalar tensor, got \(8,\); reduce it"),
    "loss_fn returns a float": Case(mlp, adapt(loss_fn=lambda out, b: 1.0), LossError,
                                    "must be a scalar tensor, got float"),
    "loss_fn returns NaN": Case(mlp, adapt(loss_fn=lambda out, b: out.sum() * float("nan")), LossError,
                                r"not finite \(nan\)"),
    "NaN in the model's weights": Case(nan_mlp, adapt(), LossError, "not finite"),
    "float target for the default cross-entropy": Case(mlp, with_batches(lambda s: (s[0], s[1].float())),
                                                       LossError, "target has dtype torch.float32.*loss_fn="),
    "class target out of range": Case(mlp, with_batches(lambda s: (s[0], s[1] + 10)), LossError,
                                      r"cross-entropy loss failed.*class in \[0, 5\)"),
    "one target per prediction missing": Case(mlp, with_batches(lambda s: (s[0], s[1][:3])), LossError,
                                              r"logits \(8, 5\), target \(3,\)"),
    # selection
    "no op matches targets": Case(mlp, adapt(targets=["encoder.*"]), MatchError,
                                  r"no op selected.*weight ops seen: w1 \(not matched by targets\)"),
    "exclude removes every op": Case(mlp, adapt(exclude="*"), MatchError, r"w2 \(excluded by '\*'\)"),
    "train= matches no parameter": Case(mlp, adapt(train=["classifier.*"]), MatchError,
                                        r"train=\['classifier.\*'\] matches no parameter; names look like"),
    "integer-only model": Case(lambda: (IntegerOnly(), (torch.ones(2, 4, dtype=torch.long),)),
                               adapt(loss_fn=lambda out, b: out.float().sum()), MatchError,
                               "table \\(weight dtype torch.int64 is not floating point"),
    "model without weight ops": Case(lambda: (NoWeightOps(), (torch.tensor([[1, 2]]), torch.tensor([0]))),
                                     adapt(), MatchError, "weight ops seen: none"),
    # options
    "rank 0": Case(mlp, adapt(rank=0), ConfigError, "rank must be a positive int, got 0"),
    "negative rank": Case(mlp, adapt(rank=-4), ConfigError, "rank must be a positive int, got -4"),
    "float rank": Case(mlp, adapt(rank=4.0), ConfigError, r"rank must be a positive int, got 4.0"),
    "bool rank": Case(mlp, adapt(rank=True), ConfigError, "rank must be a positive int, got True"),
    "unknown init mode": Case(mlp, adapt(init="pissa"), ConfigError, "unknown init mode 'pissa'; choose one of Vr"),
    "unknown op kind": Case(mlp, adapt(kinds=["lstm"]), ConfigError, r"unknown op kinds \['lstm'\]"),
    "seed that is not an int": Case(mlp, adapt(seed="42"), ConfigError, "seed must be an int, got '42'"),
    "pattern that is not a string": Case(mlp, adapt(targets=[1, 2]), ConfigError,
                                         r"targets must be a string or a list of strings, got \[1, 2\]"),
}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_gets_a_clear_error_and_the_model_is_left_as_it_was(name):
    case = CATALOGUE[name]
    model, sample = case.build()
    before = Snapshot(model)
    with pytest.raises(case.error, match=case.match):
        case.call(model, sample)
    before.assert_unchanged(model)


def test_the_model_is_left_as_it_was_when_the_users_loss_raises_midway():
    model, sample = mlp()
    model.train()
    model.head.requires_grad_(False)
    before = Snapshot(model)
    calls = []

    def flaky_loss(out: torch.Tensor, batch: Any) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the user's loss broke")
        return F.cross_entropy(out, batch[1])

    with pytest.raises(RuntimeError, match="the user's loss broke"):  # the user's own error, unchanged
        giva_fx.adapt(model, [sample, sample, sample], loss_fn=flaky_loss, progress=False)
    assert len(calls) == 2
    before.assert_unchanged(model)


def test_a_misspelled_keyword_input_is_warned_about():
    model, sample = bert()
    before = Snapshot(model)
    batch = {**sample, "atention_mask": sample["attention_mask"].clone()}
    with pytest.warns(UserWarning, match=r"ignores batch input\(s\) \['atention_mask'\].*forward\(input_ids, "
                                         r"attention_mask"):
        giva_fx.adapt(model, batch, rank=2, progress=False)
    before.assert_unchanged(model)


def test_training_a_tied_parameter_fully_keeps_the_tie():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 32, (2, 6))
    batch = {"input_ids": ids, "labels": ids}
    before = Snapshot(model)
    adapted = giva_fx.adapt(model, batch, rank=2, train=["lm_head.weight"], progress=False)  # named by its alias
    before.assert_unchanged(model)
    gm = adapted.graph_module
    assert adapted.full_train == ("transformer.wte.weight",)
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("transformer.wte.weight")
    opt = torch.optim.SGD(giva_fx.trainable_parameters(adapted).values(), lr=0.5)
    adapted.train()
    adapted(**batch).loss.backward()
    opt.step()
    adapted.eval()
    with torch.no_grad():
        trained = adapted(**batch).logits
        giva_fx.merge(adapted, model)  # the user's tied embedding and head receive the one trained tensor
        assert model.lm_head.weight is model.transformer.wte.weight
        torch.testing.assert_close(model(**batch).logits, trained, rtol=1e-5, atol=1e-5)


def test_a_failed_capture_is_one_error_not_a_logged_traceback(caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    levels = {name: logging.getLogger(name).level for name in ("torch._export", "torch._subclasses.fake_tensor")}
    with caplog.at_level(logging.DEBUG), pytest.raises(CaptureError, match="same reduction dim"):
        giva_fx.adapt(model, (torch.randn(3, 5), torch.tensor([0, 1, 0])), progress=False)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert {name: logging.getLogger(name).level for name in levels} == levels
