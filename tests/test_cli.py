"""The giva-fx command line: inspect -> adapt -> export -> train end to end, checked against the Python API,
PyTorch and ONNX Runtime; exit codes and one-line errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import giva_fx
from giva_fx.cli import cli
from giva_fx.specs import DataOptions, ModelOptions, load_batches, load_model
from tests.test_specs import tiny_bert_dir

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RANK, SEED = 4, 3
WORDS = ["good", "bad", "movie", "plot", "very", "the"]


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def ort_logits(path: Path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(["logits"], {n: feeds[n].numpy() for n in names})[0]


# ---- Hugging Face: a BERT directory and JSONL text, through CliRunner -------------------------------

@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Every command once on a tiny BERT directory; (root, outputs of each command)."""
    root = tmp_path_factory.mktemp("hf")
    bert = tiny_bert_dir(root / "bert")
    gen = np.random.default_rng(0)
    lines = []
    for _ in range(20):  # label 1 when the text says "good", else 0: something to learn
        words = list(gen.choice(WORDS, size=5))
        lines.append({"text": " ".join(words), "label": int("good" in words)})
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    common = [f"hf:{bert}", "--batch", root / "train.jsonl", "--batch-size", 8]
    out = {
        "inspect": run("inspect", *common, "--rank", RANK, "--json"),
        "adapt": run("adapt", *common, "--rank", RANK, "--seed", SEED, "--batches", 2, "--init", "VrUr",
                     "--out", root / "adapter.safetensors", "-q"),
        "export": run("export", *common, "--adapter", root / "adapter.safetensors", "--onnx", root / "model.onnx",
                      "--training-artifacts", root / "artifacts"),
        "train": run("train", root / "artifacts", "--data", root / "train.jsonl", "--tokenizer", bert,
                     "--batch-size", 8, "--steps", 30, "--lr", 0.05, "--onnx", root / "trained.onnx", "-q"),
    }
    return root, out


def hf_batches(root: Path, count: int | None = None) -> tuple[torch.nn.Module, list]:
    model = load_model(f"hf:{root / 'bert'}")
    return model.module, load_batches(model.data, data=str(root / "train.jsonl"), batch_size=8, count=count,
                                      options=DataOptions())


def test_inspect_lists_every_linear_but_the_head_with_giva_lora_vera_costs(hf):
    root, out = hf
    report = json.loads(out["inspect"].stdout)
    model, _ = hf_batches(root)
    linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {r["weight"] for r in report["ops"]} == set(linears) - {"classifier.weight"}
    assert [(s["weight"], "head" in s["reason"]) for s in report["skipped"]] == [("classifier.weight", True)]
    ops = [linears[r["weight"]] for r in report["ops"]]
    for row in report["ops"]:
        m = linears[row["weight"]]
        assert row["shape"] == [m.out_features, m.in_features] and row["rank"] == RANK
    costs = {c["method"]: c for c in report["compare"]}
    assert costs["GiVA"]["trainable"] == sum(RANK + m.out_features for m in ops)
    assert costs["LoRA"]["trainable"] == sum(RANK * (m.in_features + m.out_features) for m in ops)
    assert costs["VeRA"]["rank"] == 8 * RANK
    assert costs["VeRA"]["trainable"] == sum(8 * RANK + m.out_features for m in ops)
    assert costs["VeRA"]["frozen"] == 8 * RANK * (max(m.in_features for m in ops) + max(m.out_features for m in ops))


def test_inspect_clamps_ranks_to_each_op_shape(hf):
    root, _ = hf
    report = json.loads(run("inspect", f"hf:{root / 'bert'}", "--rank", 20, "--json").stdout)
    assert {tuple(r["shape"]): r["rank"] for r in report["ops"]} == {(16, 16): 16, (32, 16): 16, (16, 32): 16}
    text = run("inspect", f"hf:{root / 'bert'}", "--rank", 20).stdout
    assert re.search(r"^GiVA\s+20\s", text, re.M) and re.search(r"^VeRA\s+160\s", text, re.M)


def test_inspect_passes_the_op_selection_to_adapt(hf):
    root, _ = hf
    report = json.loads(run("inspect", f"hf:{root / 'bert'}", "--exclude", "*.attention.*,*pooler*",
                            "--train", "classifier.*", "--json").stdout)
    assert {r["weight"].split(".")[-2] for r in report["ops"]} == {"dense"}
    assert not any(".attention." in r["weight"] for r in report["ops"])
    reasons = {s["weight"]: s["reason"] for s in report["skipped"]}
    assert reasons["bert.pooler.dense.weight"] == "excluded by '*pooler*'"
    assert reasons["classifier.weight"].startswith("trained fully")
    assert report["full_params"] == 16 * 3 + 3  # the classifier's weight and bias
    run("inspect", f"hf:{root / 'bert'}", "--kind", "attention", code=2)


def test_adapt_writes_the_bases_the_python_api_computes_on_the_same_batches(hf):
    root, out = hf
    path = root / "adapter.safetensors"
    assert f"wrote {path}" in out["adapt"].stdout
    model, batches = hf_batches(root, count=2)
    # bases and vectors only: r * (in + out) + r + out numbers per op, nothing of the base model
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"]
    stored = load_file(str(path))
    assert not set(stored) & set(model.state_dict())
    assert sum(t.numel() for t in stored.values()) == sum(
        RANK * (m.in_features + m.out_features) + RANK + m.out_features for m in linears)
    expected = giva_fx.adapt(model, batches, rank=RANK, init="VrUr", seed=SEED, progress=False)
    loaded = giva_fx.load_adapter(model, path, batches[0])
    assert loaded.adapters().keys() == expected.adapters().keys()
    for name, adapter in loaded.adapters().items():
        torch.testing.assert_close(adapter.A, expected.adapters()[name].A, rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.B, expected.adapters()[name].B, rtol=0, atol=1e-6)


def test_exported_onnx_runs_and_matches_pytorch(hf):
    root, out = hf
    assert "wrote" in out["export"].stdout and (root / "artifacts" / "giva_fx.json").is_file()
    model, batches = hf_batches(root, count=1)
    adapted = giva_fx.load_adapter(model, root / "adapter.safetensors", batches[0]).eval()
    with torch.no_grad():
        expected = adapted(**batches[0]).logits.numpy()
    np.testing.assert_allclose(ort_logits(root / "model.onnx", batches[0]), expected, rtol=1e-4, atol=1e-5)


def test_train_learns_and_its_checkpoint_and_onnx_carry_the_trained_vectors(hf):
    root, out = hf
    losses = re.search(r"loss on the first batch: ([\d.]+) -> ([\d.]+)", out["train"].stdout)
    before, after = map(float, losses.groups())
    assert after < before
    assert "trained 30 steps on 2 batch(es)" in out["train"].stdout  # 20 rows: the short third batch is left out
    ckpt = root / "artifacts" / "trained.ckpt"
    assert f"wrote {ckpt}" in out["train"].stdout
    model, batches = hf_batches(root, count=1)
    adapted = giva_fx.load_adapter(model, root / "adapter.safetensors", batches[0]).eval()
    with torch.no_grad():
        initial = adapted(**batches[0]).logits
    giva_fx.export.load_ort_checkpoint(adapted, ckpt)
    vectors = giva_fx.trainable_parameters(adapted)
    assert all(v.abs().sum() > 0 for n, v in vectors.items() if n.endswith("lambda_o"))
    with torch.no_grad():
        trained = adapted(**batches[0]).logits
    assert (trained - initial).abs().max() > 1e-3
    torch.testing.assert_close(F.cross_entropy(trained, batches[0]["labels"]).item(), after, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ort_logits(root / "trained.onnx", batches[0]), trained.numpy(), rtol=1e-4, atol=1e-5)


def test_existing_outputs_are_kept_unless_overwrite(hf):
    root, _ = hf
    path = root / "adapter.safetensors"
    before = path.read_bytes()
    result = run("adapt", f"hf:{root / 'bert'}", "--synthetic", "input_ids=2x4:int<10", "--out", path, code=2)
    assert "exists; pass --overwrite" in result.stderr and path.read_bytes() == before
    result = run("train", root / "artifacts", "--synthetic", "input_ids=2x4:int<10", "--steps", 1, code=2)
    assert "trained.ckpt exists; pass --overwrite" in result.stderr


def test_an_adapter_from_another_model_is_refused_naming_no_strict(hf, tmp_path):
    root, _ = hf
    other = tiny_bert_dir(tmp_path / "other", tokenizer=False)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "model.safetensors"))
    result = run("export", f"hf:{other}", "--adapter", root / "adapter.safetensors", "--synthetic",
                 "input_ids=2x4:int<10", "--onnx", tmp_path / "m.onnx", code=1)
    assert "does not fit this model" in result.stderr and "--no-strict" in result.stderr
    assert not (tmp_path / "m.onnx").exists()


# ---- errors and help ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "adapt", "export", "train"])
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert "Example" in result.stdout and "--verbose" in result.stdout


@pytest.mark.parametrize("args, where, what", [
    (["inspect", "bert"], "MODEL", "not a model spec"),
    (["inspect", "hf:/nonexistent"], "MODEL", "does not exist"),
    (["inspect", "py:mod:fn", "--model-arg", "depth"], "MODEL", "not KEY=VALUE"),
    (["adapt", "timm:resnet18", "--synthetic", "x=2x3x8x8", "--out", "a.safetensors", "--rank", "0"], "--rank", ""),
    (["export", "timm:resnet18", "--synthetic", "x=2x3x8x8", "--adapter", __file__], "", "nothing to export"),
])
def test_bad_usage_exits_2_naming_the_argument(args, where, what):
    result = run(*args, code=2)
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and where in error[0] and what in error[0]
    assert "Traceback" not in result.stderr


def test_bad_synthetic_spec_exits_2_naming_synthetic(hf):
    root, _ = hf
    result = run("inspect", f"hf:{root / 'bert'}", "--synthetic", "input_ids=4x16:long", code=2)
    assert "--synthetic" in result.stderr and "NAME=DIMS[:KIND]" in result.stderr


def test_a_failure_is_one_line_exit_1_and_verbose_adds_the_traceback(hf):
    root, _ = hf
    args = ["inspect", f"hf:{root / 'bert'}", "--synthetic", "pixel_values=2x3x8x8"]
    quiet = run(*args, code=1)
    assert quiet.stderr.strip().count("\n") == 0 and quiet.stderr.startswith("Error: torch.export could not capture")
    loud = run(*args, "--verbose", code=1)
    assert "Traceback (most recent call last)" in loud.stderr


# ---- timm: a ViT from a name, weights from a checkpoint, npz data, through the installed script ------------

def test_console_script_runs_timm_end_to_end(tmp_path):
    script = Path(sys.executable).parent / "giva-fx"
    assert script.is_file(), "install the package (pip install -e .) to get the giva-fx script"
    vit = ["timm:vit_tiny_patch16_224", "--img-size", "16", "--num-classes", "3", "--model-arg", "patch_size=8",
           "--model-arg", "embed_dim=24", "--model-arg", "depth=1", "--model-arg", "num_heads=2"]
    model = load_model(vit[0], ModelOptions(img_size=16, num_classes=3, model_args={
        "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2})).module
    gen = torch.Generator().manual_seed(0)
    weights = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    save_file(weights, str(tmp_path / "vit.safetensors"))
    x = np.random.default_rng(0).normal(size=(16, 3, 16, 16))
    np.savez(tmp_path / "data.npz", x=x, y=(x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64))
    model_args = [*vit, "--checkpoint", tmp_path / "vit.safetensors"]
    data = ["--batch", tmp_path / "data.npz", "--batch-size", 8]

    def sh(*args: object) -> str:
        done = subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    sh("adapt", *model_args, *data, "--rank", RANK, "--out", tmp_path / "vit.giva.safetensors")
    sh("export", *model_args, *data, "--adapter", tmp_path / "vit.giva.safetensors", "--unmerged",
       "--onnx", tmp_path / "vit.onnx", "--training-artifacts", tmp_path / "art")
    trained = sh("train", tmp_path / "art", "--data", tmp_path / "data.npz", "--batch-size", 8, "--steps", 10,
                 "--lr", 0.05, "--out", tmp_path / "vit.ckpt", "-q")
    assert "loss on the first batch" in trained and (tmp_path / "vit.ckpt").is_file()
    # the adapter was built on the checkpoint's weights, and the ONNX model runs like PyTorch
    model.load_state_dict(weights)
    batch = (torch.from_numpy(x[:8]).float(), torch.from_numpy(np.zeros(8, dtype=np.int64)))
    adapted = giva_fx.load_adapter(model, tmp_path / "vit.giva.safetensors", batch).eval()
    with torch.no_grad():
        expected = adapted(batch[0]).numpy()
    np.testing.assert_allclose(ort_logits(tmp_path / "vit.onnx", {"input": batch[0]}), expected, rtol=1e-4, atol=1e-5)
    assert set(load_file(str(tmp_path / "vit.giva.safetensors"))) >= set(giva_fx.trainable_parameters(adapted))
