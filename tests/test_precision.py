"""Low precision: bf16 / fp16 models get float32 SVDs, adapters in their own dtype, an exact start,
working training, merges and adapter files.

On CPU every step works in fp16 too, with one caveat that is torch's, not ours: AdamW's default
eps=1e-8 rounds to 0 in fp16 and lambda_s's first gradient is exactly 0 (lambda_o starts at 0), so
pure-fp16 AdamW divides 0 by 0. Use eps >= 1e-4, fp32 adapters with autocast, or bf16.
"""
from __future__ import annotations

import pytest
import safetensors
import torch
import torch.nn.functional as F

import giva_fx
from tests.models import bert, call, functional_mlp, logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LOW = [torch.bfloat16, torch.float16]


def low_precision(factory, dtype: torch.dtype):
    model, sample = factory()
    model = model.to(dtype).eval()
    if isinstance(sample, tuple):
        sample = (sample[0].to(dtype), sample[1])
    return model, sample


def loss_of(out, sample) -> torch.Tensor:
    return out.loss if hasattr(out, "loss") else F.cross_entropy(out.float(), sample[1])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("factory", [functional_mlp, bert], ids=["mlp", "bert"])
def test_adapters_take_the_model_dtype_and_start_exactly_at_the_original(factory, dtype):
    model, sample = low_precision(factory, dtype)
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False).eval()
    for adapter in adapted.adapters().values():
        assert {t.dtype for t in (adapter.A, adapter.B, adapter.lambda_s, adapter.lambda_o)} == {dtype}
    with torch.no_grad():
        assert torch.equal(logits(call(adapted, sample)), logits(call(model, sample)))


def test_bases_of_a_bf16_model_span_the_float32_svd_of_its_gradient():
    model, sample = low_precision(functional_mlp, torch.bfloat16)
    adapted = giva_fx.adapt(model, sample, rank=3, progress=False)
    F.cross_entropy(model(sample[0]).float(), sample[1]).backward()  # the reference: plain autograd
    grad = model.w2.grad.float()
    model.zero_grad()
    _, s, vh = torch.linalg.svd(grad)
    assert s[2] > 1.2 * s[3]
    a = adapted.adapters()["w2"].A.float()
    cosines = torch.linalg.svdvals(a @ vh[:3].T)  # principal angles between the two row spaces
    torch.testing.assert_close(cosines, torch.ones(3), atol=2e-2, rtol=0)  # bf16 storage: ~3 digits


@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 1e-8), (torch.float16, 1e-4)], ids=["bf16", "fp16"])
def test_training_in_low_precision_lowers_the_loss_and_merges(dtype, eps):
    model, sample = low_precision(bert, dtype)
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False)
    opt = torch.optim.AdamW(giva_fx.trainable_parameters(adapted).values(), lr=2e-2, eps=eps)
    adapted.train()
    losses = []
    for _ in range(8):
        loss = loss_of(call(adapted, sample), sample)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.02
    adapted.eval()
    with torch.no_grad():
        trained = logits(call(adapted, sample)).float()
        giva_fx.merge(adapted, model)
        merged = logits(call(model, sample)).float()
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == dtype
    torch.testing.assert_close(merged, trained, atol=3e-2, rtol=3e-2)  # one rounding of W + dW to 8/11 bits


def test_bf16_adapter_files_store_bf16_and_reload_exactly(tmp_path):
    model, sample = low_precision(functional_mlp, torch.bfloat16)
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False)
    with torch.no_grad():
        for p in giva_fx.trainable_parameters(adapted).values():
            p.add_(torch.randn_like(p) * 0.1)
    path = giva_fx.save_adapter(adapted, tmp_path / "bf16.safetensors")
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    loaded = giva_fx.load_adapter(model, path, sample).eval()
    adapted.eval()
    with torch.no_grad():
        assert torch.equal(call(loaded, sample), call(adapted, sample))
