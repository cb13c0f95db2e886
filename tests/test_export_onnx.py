"""ONNX inference export: merged and unmerged models compute what the PyTorch adapted model computes,
at any batch (and sequence) size, and exporting changes nothing in the user's or the adapted model."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import giva_fx
import giva_fx.export as gx
from giva_fx.errors import ExportError
from tests.models import bert, call, functional_mlp, gpt2, logits, resized, vit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def resnet() -> tuple[torch.nn.Module, tuple]:
    """A small timm ResNet: conv adapters, batch norm, max pooling, strided downsampling."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 16, 32), stem_width=8, num_classes=5)
    with torch.no_grad():  # trained-looking statistics, so eval-mode batch norm is not near the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 5, (4,), generator=gen))


CASES = {"mlp": functional_mlp, "bert": bert, "gpt2": gpt2, "vit": vit, "resnet": resnet}


def _feeds(session, sample) -> dict[str, np.ndarray]:
    names = {i.name for i in session.get_inputs()}
    if isinstance(sample, dict):
        return {k: v.numpy() for k, v in sample.items() if k in names}
    return {"input": sample[0].numpy()}


def _randomize(adapted: giva_fx.GivaModel, seed: int = 3) -> None:
    """Trained-looking vectors, so dW is not zero and merged differs from the base model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in giva_fx.trainable_parameters(adapted).values():
            p.copy_(p + 0.5 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, user model, sample, adapted model with non-zero dW, merged .onnx, unmerged .onnx)."""
    model, sample = CASES[request.param]()
    model.eval()
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False)
    _randomize(adapted)
    out = tmp_path_factory.mktemp(request.param)
    merged = gx.onnx(adapted, sample, out / "merged.onnx")
    unmerged = gx.onnx(adapted, sample, out / "unmerged.onnx", merged=False)
    return request.param, model, sample, adapted, merged, unmerged


def test_merged_and_unmerged_models_match_pytorch_at_other_batch_and_sequence_sizes(case):
    import onnxruntime as ort

    _, model, sample, adapted, merged, unmerged = case
    sessions = [ort.InferenceSession(str(p)) for p in (merged, unmerged)]
    adapted.eval()
    for batch in (sample, resized(sample, batch=3, seq=7)):
        with torch.no_grad():
            expected = logits(call(adapted, batch)).numpy()
            base = logits(call(model, batch)).numpy()
        assert np.abs(expected - base).max() > 1e-3  # the adapters change the outputs: a real comparison
        got_merged, got_unmerged = (s.run(["logits"], _feeds(s, batch))[0] for s in sessions)
        assert got_merged.shape == expected.shape
        # float32; the merged model adds dW to W before the op instead of after it
        np.testing.assert_allclose(got_unmerged, expected, rtol=0, atol=2e-5)
        np.testing.assert_allclose(got_merged, expected, rtol=0, atol=2e-5)
        np.testing.assert_allclose(got_merged, got_unmerged, rtol=0, atol=2e-5)


def test_the_merged_model_holds_the_base_weights_with_dw_folded_in_and_nothing_more(case):
    import onnx

    _, model, _, adapted, merged, unmerged = case
    graph = onnx.load(merged).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert set(inits) <= set(own)  # the model's own tensors under their own names: no adapter tensor
    reference = copy.deepcopy(adapted)  # its source model shares storage with it, as after adapt()
    folded = giva_fx.merge(reference, reference.source)
    for name in adapted.adapters():
        np.testing.assert_allclose(inits[name], folded.get_parameter(name).detach().numpy(), rtol=0, atol=1e-6)
        assert not np.allclose(inits[name], own[name].detach().numpy(), atol=1e-4), name  # dW is in
    assert sum(a.nbytes for a in inits.values()) <= sum(t.numel() * t.element_size() for t in own.values())
    unmerged_graph = onnx.load(unmerged).graph
    assert len(graph.node) < len(unmerged_graph.node)
    assert len(graph.initializer) == len(unmerged_graph.initializer) - 4 * len(adapted.adapters())


def test_the_unmerged_model_keeps_each_lambda_as_a_named_initializer_with_its_value(case):
    import onnx

    _, _, _, adapted, _, unmerged = case
    graph = onnx.load(unmerged).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    read = {name for node in graph.node for name in node.input}
    vectors = {n: p for n, p in giva_fx.trainable_parameters(adapted).items()}
    assert vectors and all(n.endswith((".lambda_s", ".lambda_o")) for n in vectors)
    for name, p in vectors.items():
        assert name in read, name
        np.testing.assert_array_equal(inits[name], p.detach().numpy(), err_msg=name)


def test_exporting_changes_neither_the_user_model_nor_the_adapted_model(tmp_path):
    import onnxruntime as ort

    model, sample = bert(dropout=0.1)
    model.train()
    adapted = giva_fx.adapt(model, sample, rank=4, progress=False)
    _randomize(adapted)
    assert adapted.training  # dropout active in the adapted model

    def snapshot() -> tuple:
        return ({k: v.clone() for k, v in model.state_dict().items()},
                {k: v.clone() for k, v in adapted.state_dict().items()},
                [(m.training) for m in (*model.modules(), *adapted.modules())],
                [p.requires_grad for p in (*model.parameters(), *adapted.parameters())],
                adapted.graph_module.code, sorted(n for n, _ in adapted.named_modules()))

    before = snapshot()
    paths = [gx.onnx(adapted, sample, tmp_path / f"{m}.onnx", merged=m == "merged") for m in ("merged", "unmerged")]
    after = snapshot()
    for b, a in zip(before[:2], after[:2]):
        assert b.keys() == a.keys() and all(torch.equal(b[k], a[k]) for k in b)
    assert before[2:] == after[2:]
    adapted.eval()  # the exports are in eval form: no dropout, deterministic
    with torch.no_grad():
        expected = call(adapted, sample).logits.numpy()
    for path in paths:
        session = ort.InferenceSession(str(path))
        runs = [session.run(["logits"], _feeds(session, sample))[0] for _ in range(2)]
        np.testing.assert_array_equal(runs[0], runs[1])
        np.testing.assert_allclose(runs[0], expected, rtol=0, atol=2e-5)


def test_inputs_are_named_with_dynamic_batch_and_sequence_and_labels_are_left_out(case):
    import onnx

    name, _, sample, _, merged, _ = case
    graph = onnx.load(merged).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    if isinstance(sample, dict):  # its labels feed the model's loss, which inference does not compute
        assert "labels" in sample
        assert dims == {k: ["batch", "sequence"] for k in sample if k != "labels"}
        assert not any(n.op_type.startswith("SoftmaxCrossEntropy") for n in graph.node)
    else:
        assert dims == {"input": ["batch", *sample[0].shape[1:]]}
    assert [o.name for o in graph.output] == ["logits"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(case, tmp_path, monkeypatch):
    import onnx

    _, _, sample, adapted, merged, _ = case
    path = tmp_path / "model.onnx"
    path.write_bytes(merged.read_bytes())

    def broken_save(model, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        gx.onnx(adapted, sample, path, merged=False)
    assert path.read_bytes() == merged.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_a_merged_adapted_model_is_refused_until_unmerged(tmp_path):
    model, sample = functional_mlp()
    adapted = giva_fx.adapt(model.eval(), sample, rank=4, progress=False)
    giva_fx.merge(adapted, model)
    with pytest.raises(ExportError, match="unmerge"):
        gx.onnx(adapted, sample, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="unmerge"):
        gx.training_artifacts(adapted, sample, tmp_path / "a")
    assert list(tmp_path.iterdir()) == []
    giva_fx.unmerge(adapted, model)
    assert gx.onnx(adapted, sample, tmp_path / "m.onnx").is_file()


class _SizedBuffer(torch.nn.Module):
    """Reads the batch size through an op the size tracing does not cover (aten.new_zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x.new_zeros(x.shape[0], 3)


def test_a_size_that_cannot_be_traced_keeps_its_axis_static_instead_of_wrong(tmp_path):
    import onnx
    import onnxruntime as ort

    model = _SizedBuffer().eval()
    x = torch.randn(4, 6)
    adapted = giva_fx.adapt(model, (x, torch.tensor([0, 1, 2, 0])), rank=2, progress=False, targets=["fc.weight"])
    path = gx.onnx(adapted, (x,), tmp_path / "m.onnx")
    (dims,) = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(path).graph.input]
    assert dims == [4, 6]
    session = ort.InferenceSession(str(path))
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], adapted(x).detach().numpy(), atol=1e-6)
    with pytest.raises(Exception, match="Got: 3 Expected: 4"):  # refused, not computed with the wrong size
        session.run(None, {"input": torch.randn(3, 6).numpy()})
