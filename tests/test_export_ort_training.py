"""ONNX Runtime training artifacts: ORT trains exactly the adapter vectors, step for step as PyTorch does,
and what it trains comes back into the PyTorch adapted model."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import giva_fx
import giva_fx.export as gx
from giva_fx.batches import as_batch
from giva_fx.errors import ConfigError, ExportError
from giva_fx.export import ort_training
from giva_fx.loss import batch_loss
from tests.models import VOCAB, bert, functional_mlp, gpt2, resized
from tests.test_export_onnx import resnet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS, LR, BETAS, EPS, WEIGHT_DECAY = 20, 1e-2, (0.9, 0.999), 1e-8, 0.01


def _batches(case: str, n: int = 4) -> list:
    """`n` different batches of the case's form (the parity runs cycle through them)."""
    gen = torch.Generator().manual_seed(11)
    if case == "mlp":
        return [(torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(n)]
    if case == "resnet":
        return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen))
                for _ in range(n)]
    if case == "gpt2":  # causal LM: its own loss shifts the labels
        return [{"input_ids": (ids := torch.randint(0, VOCAB, (4, 10), generator=gen)), "labels": ids}
                for _ in range(n)]
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (4, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 7:] = 0  # padding in one row exercises the attention mask
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (4,), generator=gen)})
    return out


# case -> (factory, adapt() keywords, loss)
CASES = {
    "mlp": (functional_mlp, {}, "cross_entropy"),
    "bert": (bert, {"train": ["classifier.*"]}, "model"),
    "gpt2": (gpt2, {}, "model"),
    "resnet": (resnet, {}, "cross_entropy"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, adapted model in eval form, artifacts directory, batches)."""
    factory, kwargs, loss = CASES[request.param]
    model, sample = factory()
    model.eval()
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False, **kwargs).eval()
    out = tmp_path_factory.mktemp(request.param) / "artifacts"
    gx.training_artifacts(adapted, sample, out, loss=loss, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    return request.param, adapted, out, _batches(request.param)


def _torch_run(adapted, batches, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The reference: plain PyTorch AdamW with the same settings on a copy of the adapted model."""
    model = copy.deepcopy(adapted).eval()
    params = giva_fx.trainable_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    losses = []
    for i in range(steps):
        batch = as_batch(batches[i % len(batches)])
        loss = batch_loss(model(*batch.args, **batch.kwargs), batch, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in params.items()}


def test_ort_training_matches_pytorch_step_for_step(case):
    name, adapted, out, batches = case
    ref_losses, ref_vectors = _torch_run(adapted, batches, STEPS)
    trainer = gx.OrtTrainer(out, lr=LR)
    losses = [trainer.step(batches[i % len(batches)]) for i in range(STEPS)]
    # Same float32 maths summed in another order: losses agree to a few ulps (seen: <= 3.4e-7 relative).
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6, atol=0)
    assert losses[-1] < losses[0]  # it trains at all
    # Adam divides by sqrt(v), which amplifies those ulps in tiny gradients; vectors are O(1) and agree
    # to ~1e-6 after 20 steps (seen: <= 8.3e-7). onnxblock's own AdamW rule (mode 1) misses by 4.5e-5.
    for vec_name, ref in ref_vectors.items():
        got = trainer.state.parameters[vec_name].data
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5, err_msg=vec_name)


def test_the_trainable_set_is_exactly_the_adapter_vectors_each_its_own_initializer(case):
    import onnx
    from onnxruntime.training import api

    name, adapted, out, _ = case
    expected = {n: tuple(p.shape) for n, p in giva_fx.trainable_parameters(adapted).items()}
    n_adapters = len(adapted.adapters())
    assert len(expected) == 2 * n_adapters + (2 if name == "bert" else 0)  # + classifier weight and bias
    for artifact in (ort_training.TRAINING_MODEL, ort_training.EVAL_MODEL, ort_training.OPTIMIZER_MODEL):
        assert onnx.load(out / artifact).ir_version <= 10, artifact  # what onnxruntime 1.19 loads
    training = onnx.load(out / ort_training.TRAINING_MODEL).graph
    grads = [o.name.removesuffix("_grad.accumulation.out") for o in training.output
             if o.name.endswith("_grad.accumulation.out")]
    assert sorted(grads) == sorted(expected)  # gradients for these and nothing else
    inputs = [i.name for i in training.input]
    assert all(inputs.count(n) == 1 for n in expected)  # one parameter each: none folded or shared
    assert json.loads((out / ort_training.INFO).read_text())["trainable"] == {k: list(v) for k, v in expected.items()}
    state = api.CheckpointState.load_checkpoint(out / ort_training.CHECKPOINT)
    module = api.Module(out / ort_training.TRAINING_MODEL, state, out / ort_training.EVAL_MODEL)
    assert module.get_parameters_size(trainable_only=True) == sum(int(np.prod(s)) for s in expected.values())
    for n, p in giva_fx.trainable_parameters(adapted).items():  # their own values, e.g. lambda_s = 1, lambda_o = 0
        assert state.parameters[n].requires_grad
        np.testing.assert_array_equal(state.parameters[n].data, p.detach().numpy(), err_msg=n)
    for weight in adapted.adapters():  # the adapted weights and the bases are frozen
        for frozen in (weight, f"{weight}.A", f"{weight}.B"):
            assert not state.parameters[frozen].requires_grad, frozen


def test_gradients_reach_every_adapter_through_every_block_and_match_pytorch(tmp_path):
    """Non-zero lambda_o everywhere, so every vector has a gradient; ORT's must be PyTorch's."""
    model, sample = bert()
    model.eval()
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in giva_fx.trainable_parameters(adapted).values():
            p.copy_(torch.randn(p.shape, generator=gen))
    gx.training_artifacts(adapted, sample, tmp_path / "a", loss="cross_entropy")
    batch = _batches("bert")[1]
    got = gx.OrtTrainer(tmp_path / "a").gradients(batch)
    b = as_batch(batch)
    batch_loss(adapted(*b.args, **b.kwargs), b, None).backward()
    layers = set()
    for n, p in giva_fx.trainable_parameters(adapted).items():
        assert np.abs(p.grad.numpy()).max() > 1e-6, n
        # float32 sums in another order: a few ulps of the largest gradient entry
        np.testing.assert_allclose(got[n], p.grad.numpy(), rtol=1e-4, atol=1e-6 * np.abs(p.grad.numpy()).max(),
                                   err_msg=n)
        if ".layer." in n:
            layers.add(n.split(".layer.")[1].split(".")[0])
    assert layers == {"0", "1"}  # layer 0's gradients pass through layer 1's LayerNorms and attention


def test_vectors_trained_in_ort_come_back_into_pytorch_and_merge(case, tmp_path):
    name, adapted, out, batches = case
    trainer = gx.OrtTrainer(out, lr=LR)
    for i in range(5):
        trainer.step(batches[i % len(batches)])
    ckpt = trainer.save(tmp_path / "trained.ckpt")
    back = copy.deepcopy(adapted)  # deepcopy keeps the source model sharing storage with the copy
    gx.load_ort_checkpoint(back, ckpt)
    for n, p in giva_fx.trainable_parameters(back).items():
        np.testing.assert_array_equal(p.detach().numpy(), trainer.state.parameters[n].data, err_msg=n)
    held_out = resized(batches[-1], batch=3, seq=7)  # other batch and sequence sizes than at export
    expected = trainer.evaluate(held_out)
    b = as_batch(held_out)
    with torch.no_grad():
        out_pt = back(*b.args, **b.kwargs)
        logits = out_pt if isinstance(out_pt, torch.Tensor) else out_pt.logits
        loss = batch_loss(out_pt, b, None).item()
        merged = giva_fx.merge(back, back.source)
        merged_out = merged(*b.args, **b.kwargs)
    np.testing.assert_allclose(logits.numpy(), expected.logits, rtol=0, atol=2e-6)
    np.testing.assert_allclose(loss, expected.loss, rtol=1e-6)
    merged_logits = merged_out if isinstance(merged_out, torch.Tensor) else merged_out.logits
    np.testing.assert_allclose(merged_logits.numpy(), expected.logits, rtol=0, atol=2e-5)


def test_the_trained_inference_model_gives_the_eval_model_outputs(case, tmp_path):
    import onnxruntime as ort

    name, adapted, out, batches = case
    trainer = gx.OrtTrainer(out, lr=LR)
    for i in range(3):
        trainer.step(batches[i])
    path = trainer.export_inference(tmp_path / "trained.onnx")
    b = as_batch(batches[-1])
    session = ort.InferenceSession(str(path))
    feeds = {s.name: s.take(b).numpy() for s in trainer.info.inputs if s.name in
             {i.name for i in session.get_inputs()}}
    logits = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits, trainer.evaluate(batches[-1]).logits, rtol=0, atol=1e-6)


def test_resuming_from_a_saved_checkpoint_continues_the_same_run(tmp_path):
    model, sample = functional_mlp()
    adapted = giva_fx.adapt(model.eval(), sample, rank=4, progress=False).eval()
    gx.training_artifacts(adapted, sample, tmp_path / "a")
    batches = _batches("mlp")
    schedule = {"lr": 0.05, "warmup_steps": 3, "total_steps": 12}
    straight = gx.OrtTrainer(tmp_path / "a", **schedule)
    first = [straight.step(batches[i % 4]) for i in range(12)]
    halfway = gx.OrtTrainer(tmp_path / "a", **schedule)
    [halfway.step(batches[i % 4]) for i in range(6)]
    resumed = gx.OrtTrainer(tmp_path / "a", checkpoint=halfway.save(tmp_path / "half.ckpt"), **schedule)
    assert resumed.steps == 6
    second = [resumed.step(batches[i % 4]) for i in range(6, 12)]
    assert second == first[6:]  # moments, step count and schedule all restored: bit-identical


def test_the_linear_schedule_matches_pytorch_lambda_lr(tmp_path):
    model, sample = functional_mlp()
    adapted = giva_fx.adapt(model.eval(), sample, rank=4, progress=False).eval()
    gx.training_artifacts(adapted, sample, tmp_path / "a", eps=EPS, weight_decay=WEIGHT_DECAY)
    warmup, total = 3, 10
    trainer = gx.OrtTrainer(tmp_path / "a", lr=0.05, warmup_steps=warmup, total_steps=total)
    ref = copy.deepcopy(adapted)
    params = list(giva_fx.trainable_parameters(ref).values())
    opt = torch.optim.AdamW(params, lr=0.05, eps=EPS, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup)))
    batches = _batches("mlp")
    for i in range(total + 1):
        assert trainer.lr == pytest.approx(sched.get_last_lr()[0], rel=1e-12, abs=1e-15)
        b = as_batch(batches[i % 4])
        loss = batch_loss(ref(*b.args), b, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        assert trainer.step(batches[i % 4]) == pytest.approx(loss.item(), rel=1e-6)
    for n, p in giva_fx.trainable_parameters(ref).items():
        np.testing.assert_allclose(trainer.state.parameters[n].data, p.detach().numpy(), rtol=0, atol=1e-5)


def test_mse_loss_trains_like_pytorch(tmp_path):
    model, _ = functional_mlp()
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 12, generator=gen), torch.randn(8, 5, generator=gen)) for _ in range(3)]
    mse = lambda out, raw: torch.nn.functional.mse_loss(out, raw[1])  # noqa: E731
    adapted = giva_fx.adapt(model.eval(), batches, rank=4, progress=False, loss_fn=mse).eval()
    gx.training_artifacts(adapted, batches[0], tmp_path / "a", loss="mse", eps=EPS, weight_decay=WEIGHT_DECAY)
    trainer = gx.OrtTrainer(tmp_path / "a", lr=LR)
    ref = copy.deepcopy(adapted)
    opt = torch.optim.AdamW(giva_fx.trainable_parameters(ref).values(), lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)
    for i in range(6):
        loss = mse(ref(batches[i % 3][0]), batches[i % 3])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert trainer.step(batches[i % 3]) == pytest.approx(loss.item(), rel=1e-6)


def test_a_failed_export_leaves_no_directory_and_keeps_an_old_one(tmp_path, monkeypatch):
    model, sample = functional_mlp()
    adapted = giva_fx.adapt(model.eval(), sample, rank=4, progress=False).eval()
    out = tmp_path / "a"

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ort_training, "verify", fail)  # after all files are written, before the rename
    with pytest.raises(RuntimeError, match="disk full"):
        gx.training_artifacts(adapted, sample, out)
    assert list(tmp_path.iterdir()) == []  # no out_dir, no temporary left behind
    monkeypatch.undo()
    gx.training_artifacts(adapted, sample, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match="overwrite=True"):
        gx.training_artifacts(adapted, sample, out)
    monkeypatch.setattr(ort_training, "verify", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        gx.training_artifacts(adapted, sample, out, optimizer="sgd", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    monkeypatch.undo()
    gx.training_artifacts(adapted, sample, out, optimizer="sgd", overwrite=True)
    assert json.loads((out / ort_training.INFO).read_text())["optimizer"]["name"] == "sgd"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_loading_a_checkpoint_unpickles_nothing_and_refuses_another_model(case, tmp_path, monkeypatch):
    import pickle

    name, adapted, out, _ = case
    target = copy.deepcopy(adapted)

    def no_pickle(*args, **kwargs):
        raise AssertionError("unpickling")

    for module, attr in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, attr, no_pickle)
    gx.load_ort_checkpoint(target, out)  # a directory: its initial checkpoint
    monkeypatch.undo()
    other, sample = functional_mlp() if name != "mlp" else resnet()
    other_adapted = giva_fx.adapt(other.eval(), sample, rank=4, progress=False)
    with pytest.raises(ExportError, match="was not made from this adapted model"):
        gx.load_ort_checkpoint(other_adapted, out)
    with pytest.raises(ExportError, match="no checkpoint"):
        gx.load_ort_checkpoint(target, tmp_path / "missing.ckpt")


def test_bad_options_and_batches_get_clear_errors(tmp_path):
    model, sample = functional_mlp()
    adapted = giva_fx.adapt(model.eval(), sample, rank=4, progress=False).eval()
    with pytest.raises(ConfigError, match="unknown loss"):
        gx.training_artifacts(adapted, sample, tmp_path / "a", loss="hinge")
    with pytest.raises(ConfigError, match="unknown optimizer"):
        gx.training_artifacts(adapted, sample, tmp_path / "a", optimizer="lamb")
    with pytest.raises(ExportError, match="returns its own loss"):
        gx.training_artifacts(adapted, sample, tmp_path / "a", loss="model")
    assert not (tmp_path / "a").exists()
    gx.training_artifacts(adapted, sample, tmp_path / "a")
    with pytest.raises(ConfigError, match="warmup_steps needs total_steps"):
        gx.OrtTrainer(tmp_path / "a", warmup_steps=3)
    with pytest.raises(ExportError, match="needs a target"):
        gx.OrtTrainer(tmp_path / "a").step((sample[0],))
    with pytest.raises(ExportError, match="giva_fx.json"):
        gx.OrtTrainer(tmp_path)


def test_onnxruntime_is_imported_only_when_used_and_a_missing_one_says_what_to_install(tmp_path, monkeypatch):
    import subprocess
    import sys

    code = "import giva_fx, giva_fx.export, sys; print('onnxruntime' in sys.modules, 'onnx' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
    monkeypatch.setitem(sys.modules, "onnxruntime.training.api", None)
    with pytest.raises(ImportError, match="pip install onnxruntime-training"):
        gx.OrtTrainer(tmp_path)
