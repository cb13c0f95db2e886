"""save_adapter / load_adapter: a saved adapter rebuilds the trained model exactly, refuses the
wrong model, never unpickles, and is written atomically and reproducibly."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import giva_fx
from giva_fx.errors import AdapterFileError
from giva_fx.passes.bases import INIT_MODES
from tests.models import bert, call, functional_mlp, logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def trained(model: nn.Module, sample, steps: int = 4, **kw) -> giva_fx.GivaModel:
    """`model` adapted and trained a few AdamW steps, in eval mode."""
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False, **kw)
    opt = torch.optim.AdamW(giva_fx.trainable_parameters(adapted).values(), lr=2e-2)
    adapted.train()
    for _ in range(steps):
        out = call(adapted, sample)
        loss = out.loss if hasattr(out, "loss") else F.cross_entropy(out, sample[1])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return adapted.eval()


def outputs(model: nn.Module, sample) -> torch.Tensor:
    with torch.no_grad():
        return logits(call(model, sample))


def metadata(path) -> dict:
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert list(header) == ["giva_fx"]
    return json.loads(header["giva_fx"])


def stored(path) -> set[str]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return set(f.keys())


CASES = {"functional_mlp": (functional_mlp, {}), "bert": (bert, {"train": ["classifier.*"]})}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    factory, kw = CASES[request.param]
    model, sample = factory()
    model.eval()
    adapted = trained(model, sample, **kw)
    path = tmp_path_factory.mktemp("adapters") / f"{request.param}.safetensors"
    giva_fx.save_adapter(adapted, path)
    return model, sample, adapted, path


def test_a_loaded_adapter_reproduces_the_trained_model_and_trains_on(saved):
    model, sample, adapted, path = saved
    loaded = giva_fx.load_adapter(model, path, sample).eval()
    assert not torch.allclose(outputs(adapted, sample), outputs(model, sample))  # training changed something
    torch.testing.assert_close(outputs(loaded, sample), outputs(adapted, sample), rtol=0, atol=1e-6)
    want, got = giva_fx.trainable_parameters(adapted), giva_fx.trainable_parameters(loaded)
    assert list(got) == list(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    ours = dict(loaded.graph_module.named_parameters())
    for name, p in model.named_parameters():  # frozen base weights are the user's, not copies
        if name in ours and not ours[name].requires_grad:
            assert ours[name].data_ptr() == p.data_ptr(), name
    trainable = [p for p in loaded.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in got.values()}
    loaded.train()
    out = call(loaded, sample)
    (out.loss if hasattr(out, "loss") else F.cross_entropy(out, sample[1])).backward()
    assert all(p.grad is not None for p in trainable)


def test_metadata_is_one_json_key_with_config_ops_and_a_fingerprint_of_the_base_weights(saved):
    model, _, adapted, path = saved
    meta = metadata(path)
    assert meta["format"] == 1 and meta["giva_fx_version"] == giva_fx.__version__
    assert meta["config"]["rank"] == 4 and meta["config"]["init"] == "Vr" and meta["config"]["seed"] == 0
    assert sorted(meta["ops"]) == sorted(adapted.adapters())
    params = dict(model.named_parameters())
    for op in adapted.found.ops:
        entry, weight = meta["ops"][op.weight_name], params[op.weight_name]
        assert (entry["kind"], entry["layout"], entry["rank"]) == (op.kind, op.layout, 4)
        printed = meta["fingerprint"][op.weight_name]
        assert printed["shape"] == list(weight.shape) and printed["dtype"] == "float32"
        assert printed["sha256"] == hashlib.sha256(weight.detach().numpy().tobytes()).hexdigest()


def test_same_inputs_and_seed_give_byte_identical_files(tmp_path):
    paths = []
    for i, seed in enumerate([0, 0, 1]):
        model, sample = functional_mlp()
        paths.append(tmp_path / f"{i}.safetensors")
        giva_fx.save_adapter(trained(model, sample, seed=seed), paths[-1])
    first, again, other = (p.read_bytes() for p in paths)
    assert first == again
    assert first != other


@pytest.mark.parametrize("init", INIT_MODES)
def test_seeded_bases_are_left_out_and_regenerated_bit_exactly(init, tmp_path):
    model, sample = functional_mlp()
    adapted = trained(model, sample, steps=1, init=init, seed=7)
    compact, full = tmp_path / "compact.safetensors", tmp_path / "full.safetensors"
    giva_fx.save_adapter(adapted, compact)
    giva_fx.save_adapter(adapted, full, compact=False)
    left_out = {"Vr": {"B"}, "VrUrand": {"B"}, "random": {"A", "B"}}.get(init, set())
    for name in adapted.adapters():
        assert {k for k in ("A", "B") if f"{name}.{k}" not in stored(compact)} == left_out
        assert {f"{name}.A", f"{name}.B"} <= stored(full)
    assert (compact.stat().st_size < full.stat().st_size) == bool(left_out)
    for path in (compact, full):
        loaded = giva_fx.load_adapter(model, path, sample)
        for name, adapter in adapted.adapters().items():
            for key in ("A", "B", "lambda_s", "lambda_o"):
                assert torch.equal(getattr(loaded.adapters()[name], key), getattr(adapter, key)), (name, key)


def test_trained_batch_norm_statistics_are_saved_and_restored(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
    sample = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    adapted = trained(model, sample)
    assert not torch.equal(adapted.graph_module.get_buffer("1.running_mean"), model[1].running_mean)
    giva_fx.save_adapter(adapted, tmp_path / "bn.safetensors")
    assert {"1.running_mean", "1.running_var"} <= stored(tmp_path / "bn.safetensors")
    loaded = giva_fx.load_adapter(model, tmp_path / "bn.safetensors", sample).eval()
    torch.testing.assert_close(outputs(loaded, sample), outputs(adapted, sample), rtol=0, atol=1e-6)
    assert torch.equal(model[1].running_mean, torch.zeros(16))  # the user's statistics are untouched


def test_a_model_with_other_weights_is_refused_naming_them(saved):
    model, sample, _, path = saved
    other = copy.deepcopy(model)
    name = next(iter(metadata(path)["ops"]))
    with torch.no_grad():
        other.get_parameter(name).add_(1e-3)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(AdapterFileError, match=rf"1 weight\(s\) differ(.|\n)*{name}: different values"):
        giva_fx.load_adapter(other, path, sample)
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_model_of_another_shape_is_refused_naming_the_shapes(tmp_path):
    model, sample = functional_mlp()
    giva_fx.save_adapter(trained(model, sample), tmp_path / "a.safetensors")
    torch.manual_seed(0)
    wider = type(model)(hidden=32)
    with pytest.raises(AdapterFileError, match=r"w1: shape \(24, 12\) in the file, \(32, 12\) in the model"):
        giva_fx.load_adapter(wider, tmp_path / "a.safetensors", sample)


def test_another_dtype_is_refused_unless_not_strict(tmp_path):
    model, sample = functional_mlp()
    adapted = trained(model, sample)
    giva_fx.save_adapter(adapted, tmp_path / "a.safetensors")
    doubled = copy.deepcopy(model).double()
    with pytest.raises(AdapterFileError, match="dtype float32 in the file, float64 in the model"):
        giva_fx.load_adapter(doubled, tmp_path / "a.safetensors", (sample[0].double(), sample[1]))
    with pytest.warns(UserWarning, match="applied onto weights that differ"):
        loaded = giva_fx.load_adapter(doubled, tmp_path / "a.safetensors", (sample[0].double(), sample[1]),
                                      strict=False).eval()
    torch.testing.assert_close(outputs(loaded, (sample[0].double(), sample[1])).float(), outputs(adapted, sample),
                               rtol=1e-5, atol=1e-5)


def test_not_strict_applies_what_fits_and_warns_about_what_it_skipped(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    sample = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    adapted = trained(model, sample)
    giva_fx.save_adapter(adapted, tmp_path / "a.safetensors")
    other = copy.deepcopy(model)
    other[2] = nn.Linear(16, 8)  # "2.weight" changes shape; "0.weight" still fits
    other[4] = nn.Linear(8, 3)
    with pytest.warns(UserWarning, match=r"skipped what this model cannot take:\n  2.weight: shape \(16, 16\)"):
        loaded = giva_fx.load_adapter(other, tmp_path / "a.safetensors", sample, strict=False)
    assert list(loaded.adapters()) == ["0.weight"]
    assert torch.equal(loaded.adapters()["0.weight"].lambda_o, adapted.adapters()["0.weight"].lambda_o)


def test_a_pickle_named_safetensors_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(Payload()))
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"w1.lambda_o": torch.zeros(3)}, torch_file)
    model, sample = functional_mlp()
    for path in (evil, torch_file):
        with pytest.raises(AdapterFileError, match="not a readable safetensors file.*never unpickles"):
            giva_fx.load_adapter(model, path, sample)
    assert not marker.exists()


def test_loading_calls_no_unpickler(tmp_path, monkeypatch):
    model, sample = functional_mlp()
    adapted = trained(model, sample)
    path = giva_fx.save_adapter(adapted, tmp_path / "a.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("the load path unpickled something")

    for owner, attr in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(owner, attr, refuse)
    loaded = giva_fx.load_adapter(model, path, sample).eval()
    torch.testing.assert_close(outputs(loaded, sample), outputs(adapted, sample), rtol=0, atol=1e-6)


def test_malformed_adapter_files_are_refused_with_the_reason(tmp_path):
    model, sample = functional_mlp()
    adapted = trained(model, sample, steps=1)
    good = tmp_path / "good.safetensors"
    giva_fx.save_adapter(adapted, good)
    meta, tensors = metadata(good), safetensors.torch.load_file(good)
    cases = {
        "no giva metadata": ({}, tensors, "no 'giva_fx' metadata"),
        "newer format": ({"giva_fx": json.dumps({**meta, "format": 99})}, tensors, "format 99, newer"),
        "broken json": ({"giva_fx": "{"}, tensors, "metadata is incomplete or corrupt"),
        "missing vector": ({"giva_fx": json.dumps(meta)}, {k: v for k, v in tensors.items() if k != "w1.lambda_o"},
                           r"tensor w1.lambda_o is missing, expected shape \(24,\)"),
        "wrong shape": ({"giva_fx": json.dumps(meta)}, {**tensors, "w1.A": torch.zeros(3, 5)},
                        r"tensor w1.A is shape \(3, 5\), expected shape \(4, 12\)"),
    }
    for name, (header, content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file(content, path, metadata=header)
        with pytest.raises(AdapterFileError, match=message):
            giva_fx.load_adapter(model, path, sample)
    with pytest.raises(AdapterFileError, match="no adapter file at"):
        giva_fx.load_adapter(model, tmp_path / "absent.safetensors", sample)


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    model, sample = functional_mlp()
    path = tmp_path / "adapter.safetensors"
    giva_fx.save_adapter(trained(model, sample, steps=1), path)
    previous = path.read_bytes()
    newer = trained(model, sample, steps=3)

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        giva_fx.save_adapter(newer, path)
    monkeypatch.undo()

    def crash_on_rename(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash_on_rename)
    with pytest.raises(OSError, match="power cut"):
        giva_fx.save_adapter(newer, path)
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # no temporary left behind


def test_merged_adapters_non_models_and_directories_are_not_saved(tmp_path):
    model, sample = functional_mlp()
    adapted = trained(model, sample, steps=1)
    giva_fx.merge(adapted, model)
    with pytest.raises(AdapterFileError, match=r"merged into the model.*giva_fx.unmerge"):
        giva_fx.save_adapter(adapted, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    with pytest.raises(AdapterFileError, match="takes the GivaModel"):
        giva_fx.save_adapter(model, tmp_path / "a.safetensors")
    giva_fx.unmerge(adapted, model)
    with pytest.raises(AdapterFileError, match="it is a directory; give a file path"):
        giva_fx.save_adapter(adapted, tmp_path)
