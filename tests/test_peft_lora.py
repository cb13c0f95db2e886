"""PEFT LoRA export: GiVA converts exactly into LoRA, so PEFT reproduces the trained outputs."""
from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from torch import nn

import giva_fx
from giva_fx.errors import ExportError
from giva_fx.export.peft_lora import peft_lora
from tests.models import bert, functional_mlp, gpt2
from tests.test_persist import outputs, trained

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def peft_outputs(model: nn.Module, out_dir, sample) -> torch.Tensor:
    """Outputs of PEFT's own LoRA implementation loaded from `out_dir` (on a copy of `model`)."""
    return outputs(peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out_dir)).eval(), sample)


@pytest.mark.parametrize("factory,kw", [(bert, {"train": ["classifier.*"]}), (gpt2, {})], ids=["bert", "gpt2"])
def test_peft_reproduces_the_trained_outputs(factory, kw, tmp_path):
    model, sample = factory()
    model.eval()
    adapted = trained(model, sample, **kw)
    assert peft_lora(adapted, model, tmp_path / "lora") == []
    expected = outputs(adapted, sample)
    assert not torch.allclose(expected, outputs(model, sample))
    torch.testing.assert_close(peft_outputs(model, tmp_path / "lora", sample), expected, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    owners = sorted(n.removesuffix(".weight") for n in adapted.adapters())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 4)
    assert config["target_modules"] == owners and config["rank_pattern"] == {}
    assert config["fan_in_fan_out"] == (factory is gpt2)
    assert config["modules_to_save"] == (["classifier"] if kw else None)
    tensors = safetensors.torch.load_file(tmp_path / "lora" / "adapter_model.safetensors")
    for name, adapter in adapted.adapters().items():
        key = f"base_model.model.{name.removesuffix('.weight')}"
        assert torch.equal(tensors[f"{key}.lora_A.weight"], adapter.A)
        dw = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
        torch.testing.assert_close(dw, adapter.delta_weight(), rtol=1e-5, atol=1e-7)


class Mixed(nn.Module):
    """nn.Linear layers PEFT can adapt, a bare functional weight it cannot, and a narrow layer whose
    rank is clamped (so the export needs a rank pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.bare = nn.Parameter(torch.randn(16, 16) / 4)
        self.narrow = nn.Linear(16, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(x))
        h = torch.tanh(h @ self.bare.T)
        return self.head(torch.tanh(self.narrow(h)))


def test_ops_peft_cannot_express_are_reported_and_the_rest_is_exact(tmp_path):
    torch.manual_seed(0)
    model = Mixed().eval()
    sample = (torch.randn(8, 10), torch.randint(0, 4, (8,)))
    adapted = trained(model, sample)
    assert {n: a.rank for n, a in adapted.adapters().items()} == {"fc.weight": 4, "bare": 4, "narrow.weight": 3}
    with pytest.warns(UserWarning, match=r"PEFT LoRA cannot express bare \(a bare parameter"):
        left_out = peft_lora(adapted, model, tmp_path / "lora")
    assert [(s.weight_name, s.kind) for s in left_out] == [("bare", "linear")]
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == config["alpha_pattern"] == {"narrow": 3}
    got = peft_outputs(model, tmp_path / "lora", sample)
    with torch.no_grad():
        adapted.adapters()["bare"].lambda_o.zero_()  # what the export leaves out
    torch.testing.assert_close(got, outputs(adapted, sample), rtol=1e-5, atol=1e-6)


def test_conv_adapters_export_to_peft_lora_conv_and_grouped_convs_are_reported(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    sample = (torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,)))
    adapted = trained(model, sample, kinds=("conv",))
    assert sorted(adapted.adapters()) == ["0.weight", "2.weight", "4.weight"]
    with pytest.warns(UserWarning, match="2.weight .*groups"):
        left_out = peft_lora(adapted, model, tmp_path / "lora")
    assert [s.weight_name for s in left_out] == ["2.weight"]
    got = peft_outputs(model, tmp_path / "lora", sample)
    with torch.no_grad():
        adapted.adapters()["2.weight"].lambda_o.zero_()
    torch.testing.assert_close(got, outputs(adapted, sample), rtol=1e-5, atol=1e-6)


def test_trained_batch_norm_statistics_are_reported(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    adapted = trained(model, (torch.randn(8, 6), torch.randint(0, 3, (8,))))
    left_out = peft_lora(adapted, model, tmp_path / "lora")
    assert [s.weight_name for s in left_out] == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    assert all(s.kind == "buffer" and "batch-norm" in s.reason for s in left_out)


def test_the_directory_is_written_atomically_and_not_overwritten_by_default(tmp_path, monkeypatch):
    model, sample = bert()
    adapted = trained(model, sample, steps=1)
    out = tmp_path / "lora"
    peft_lora(adapted, model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="already exists; pass overwrite=True"):
        peft_lora(adapted, model, out)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        peft_lora(adapted, model, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]


def test_merged_adapters_are_refused(tmp_path):
    model, sample = bert()
    adapted = trained(model, sample, steps=1)
    giva_fx.merge(adapted, model)
    with pytest.raises(ExportError, match="merged into the model.*unmerge"):
        peft_lora(adapted, model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_a_model_peft_cannot_express_at_all_is_refused(tmp_path):
    model, sample = functional_mlp()  # F.linear on bare parameters: no module for PEFT to attach to
    adapted = trained(model, sample, steps=1)
    with pytest.raises(ExportError, match=r"can express none of the adapted ops: w1 \(a bare parameter"):
        peft_lora(adapted, model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
