"""train()/eval() on adapted models: dropout on in training, off in eval, as in the original."""
from __future__ import annotations

import pytest
import torch

import giva_fx
from tests.models import bert, call, functional_mlp, gpt2, logits


@pytest.mark.parametrize("factory", [functional_mlp, bert, gpt2], ids=["functional", "bert", "gpt2"])
def test_dropout_follows_train_and_eval(factory):
    model, sample = factory(dropout=0.3)
    adapted = giva_fx.adapt(model, sample, rank=2, progress=False)
    model.eval()
    adapted.eval()
    with torch.no_grad():
        ref = logits(call(model, sample))
        torch.testing.assert_close(logits(call(adapted, sample)), ref, rtol=0, atol=1e-6)
        adapted.train()
        a, b = logits(call(adapted, sample)), logits(call(adapted, sample))
        assert not torch.allclose(a, b), "dropout must be active in train mode"
        assert not torch.allclose(a, ref)
        adapted.eval()
        torch.testing.assert_close(logits(call(adapted, sample)), ref, rtol=0, atol=1e-6)


def test_dropout_in_train_mode_matches_the_original_under_the_same_rng():
    model, sample = functional_mlp(dropout=0.5)
    adapted = giva_fx.adapt(model, sample, rank=2, progress=False).train()
    model.train()
    torch.manual_seed(11)
    expected = model(sample[0])
    torch.manual_seed(11)
    torch.testing.assert_close(adapted(sample[0]), expected, rtol=0, atol=1e-6)


def test_adapt_returns_the_model_in_the_mode_the_user_model_was_in():
    model, sample = functional_mlp()
    assert giva_fx.adapt(model.train(), sample, rank=2, progress=False).training
    assert not giva_fx.adapt(model.eval(), sample, rank=2, progress=False).training


def test_batch_norm_uses_running_statistics_in_eval_and_counts_steps_only_in_training():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(16, 6)
    adapted = giva_fx.adapt(model.eval(), (x, torch.randint(0, 3, (16,))), rank=2, progress=False)
    bn = adapted.graph_module.get_submodule("1")
    counter, mean = bn.num_batches_tracked.clone(), bn.running_mean.clone()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x), rtol=0, atol=1e-6)
        assert bn.num_batches_tracked == counter and torch.equal(bn.running_mean, mean)
        adapted.train()(x)
    assert bn.num_batches_tracked == counter + 1 and not torch.equal(bn.running_mean, mean)
    assert model[1].num_batches_tracked == 0 and torch.equal(model[1].running_mean, torch.zeros(8))
