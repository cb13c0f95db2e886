"""adapt() across model families: the contract every adapted model keeps."""
from __future__ import annotations

import copy

import pytest
import torch

import giva_fx
from tests.models import CASES, call, logits, resized

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, sample = CASES[request.param]()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False)
    return request.param, model, sample, adapted, before, flags


def test_the_user_model_is_left_as_it_was(case):
    _, model, _, adapted, before, flags = case
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_base_weights_share_storage_with_the_user_model(case):
    _, model, _, adapted, _, _ = case
    ours = dict(adapted.graph_module.named_parameters())
    for name, p in model.named_parameters():
        if name in ours:
            assert ours[name].data_ptr() == p.data_ptr(), name


def test_at_init_the_adapted_model_returns_the_original_outputs(case):
    _, model, sample, adapted, _, _ = case
    adapted.eval()
    with torch.no_grad():
        expected, got = call(model, sample), call(adapted, sample)
    assert type(got) is type(expected)
    torch.testing.assert_close(logits(got), logits(expected), rtol=0, atol=1e-6)


def test_only_adapter_vectors_require_grad(case):
    _, _, _, adapted, _, _ = case
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lambda_s", "lambda_o")) for n in trainable)
    assert len(trainable) == len(giva_fx.trainable_parameters(adapted))


def test_other_batch_sizes_and_sequence_lengths_work(case):
    _, model, sample, adapted, _, _ = case
    other = resized(sample, batch=3, seq=7)
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(call(adapted, other)), logits(call(model, other)), rtol=0, atol=1e-6)


def test_training_changes_only_the_vectors_and_merge_reproduces_it(case):
    name, model, sample, adapted, _, _ = case
    adapted = copy.deepcopy(adapted)
    model = copy.deepcopy(model)
    # deepcopy breaks the storage sharing: re-point the copy's base weights at the copied model
    for n, p in model.named_parameters(remove_duplicate=False):
        try:
            adapted.graph_module.get_parameter(n).data = p.data
        except AttributeError:
            pass
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    params = list(giva_fx.trainable_parameters(adapted).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    adapted.train()
    for _ in range(10):
        out = call(adapted, sample)
        loss = out.loss if hasattr(out, "loss") else torch.nn.functional.cross_entropy(out, sample[1])
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in adapted.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(p.abs().max() > 0 for n, p in giva_fx.trainable_parameters(adapted).items() if n.endswith("lambda_o"))
    adapted.eval()
    with torch.no_grad():
        trained = logits(call(adapted, sample))
        assert not torch.allclose(trained, logits(call(model.eval(), sample)))
        merged = giva_fx.merge(adapted, model)
        assert merged is model
        torch.testing.assert_close(logits(call(model, sample)), trained, rtol=1e-4, atol=1e-5)
        # after a merge the adapted model does not count dW twice
        torch.testing.assert_close(logits(call(adapted, sample)), trained, rtol=1e-4, atol=1e-5)
        giva_fx.unmerge(adapted, model)
        torch.testing.assert_close(logits(call(adapted, sample)), trained, rtol=1e-4, atol=1e-5)


def test_gradient_bases_give_a_larger_first_step_than_random_bases(case):
    """The first-order promise: |dL/dlambda_s...| at init is larger with gradient-informed A."""
    name, model, sample, _, _, _ = case

    def vector_grad_norm(init: str) -> float:
        adapted = giva_fx.adapt(model, sample, rank=4, init=init, progress=False).eval()
        # lambda_s has zero gradient while lambda_o = 0: measure through lambda_o
        out = call(adapted, sample)
        loss = out.loss if hasattr(out, "loss") else torch.nn.functional.cross_entropy(out, sample[1])
        loss.backward()
        return sum(p.grad.square().sum() for n, p in giva_fx.trainable_parameters(adapted).items()
                   if n.endswith("lambda_o")).sqrt().item()

    assert vector_grad_norm("Vr") > vector_grad_norm("random")


def test_calls_without_labels_use_the_same_adapters():
    """Adapted with labels (for the loss), called without them at inference: same function."""
    from tests.models import bert

    model, sample = bert()
    adapted = giva_fx.adapt(model, sample, rank=2, progress=False)
    with torch.no_grad():
        for p in giva_fx.trainable_parameters(adapted).values():
            p.add_(0.1)
    adapted.eval()
    no_labels = {k: v for k, v in sample.items() if k != "labels"}
    with torch.no_grad():
        full = adapted(**sample)
        bare = adapted(**no_labels)
    assert bare.loss is None and full.loss is not None
    torch.testing.assert_close(bare.logits, full.logits, rtol=0, atol=1e-6)
    assert len(giva_fx.trainable_parameters(adapted)) == 2 * len(adapted.adapters())
    assert sum(1 for _ in adapted.parameters()) == sum(1 for _ in adapted.graph_module.parameters())
