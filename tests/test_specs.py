"""specs: MODEL and data specs resolve to the model and the batches they name, offline and pickle-free."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from giva_fx.specs import (DataFormat, DataOptions, ModelOptions, SpecError, default_batch, load_batches, load_model,
                           parse_model_args, parse_synthetic, read_samples, split_batches, to_batch)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "plot", "very", "the"]


def tiny_bert_dir(path: Path, *, tokenizer: bool = True, num_labels: int = 3) -> Path:
    """A BERT classifier saved as a Hugging Face directory (weights, config, tokenizer)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=num_labels, max_position_embeddings=32)
    tf.BertForSequenceClassification(config).save_pretrained(path)
    if tokenizer:
        tf.BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_bert_dir(tmp_path_factory.mktemp("bert") / "bert")


TINY_VIT = {"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}


# ---- model specs ------------------------------------------------------------------------------

def test_hf_directory_loads_the_saved_weights(bert_dir):
    from safetensors.torch import load_file

    loaded = load_model(f"hf:{bert_dir}")
    saved = load_file(str(bert_dir / "model.safetensors"))
    state = loaded.module.state_dict()
    assert type(loaded.module).__name__ == "BertForSequenceClassification"
    assert loaded.data.takes_dict and loaded.data.tokenizer_dir == bert_dir and not loaded.module.training
    for name, value in saved.items():
        assert torch.equal(state[name], value), name


def test_hf_task_chooses_the_auto_class(bert_dir):
    loaded = load_model(f"hf:{bert_dir}", ModelOptions(task="masked-lm"))
    assert type(loaded.module).__name__ == "BertForMaskedLM"
    with pytest.raises(SpecError, match="unknown --task 'nope'; choose one of"):
        load_model(f"hf:{bert_dir}", ModelOptions(task="nope"))


def test_hf_config_json_builds_the_same_random_model_every_time(bert_dir, tmp_path):
    config = json.loads((bert_dir / "config.json").read_text())
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    a = load_model(f"hf:{path}", ModelOptions(num_labels=5)).module
    b = load_model(f"hf:{path}", ModelOptions(num_labels=5)).module
    assert a.classifier.out_features == 5
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert list(a.config.id2label) == [0, 1, 2, 3, 4]


def test_hf_num_labels_gives_a_fresh_head_on_saved_weights(bert_dir):
    saved = load_model(f"hf:{bert_dir}").module
    wider = load_model(f"hf:{bert_dir}", ModelOptions(num_labels=5)).module
    assert wider.classifier.out_features == 5 and wider.num_labels == 5
    assert torch.equal(wider.bert.pooler.dense.weight, saved.bert.pooler.dense.weight)


def test_hf_directory_without_safetensors_is_refused(bert_dir, tmp_path):
    (tmp_path / "config.json").write_text((bert_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SpecError, match=r"no \*\.safetensors weights \(only safetensors are loaded\)"):
        load_model(f"hf:{tmp_path}")


def test_timm_checkpoint_weights_are_loaded(tmp_path):
    first = load_model("timm:vit_tiny_patch16_224", ModelOptions(img_size=16, num_classes=3, model_args=TINY_VIT))
    state = {k: torch.randn_like(v) for k, v in first.module.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_model("timm:vit_tiny_patch16_224", ModelOptions(img_size=16, num_classes=3, model_args=TINY_VIT,
                                                                 checkpoint=tmp_path / "w.safetensors"))
    assert not loaded.data.takes_dict and loaded.data.image_size == 16
    for name, value in loaded.module.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_timm_checkpoint_that_does_not_fit_names_the_options(tmp_path):
    model = load_model("timm:vit_tiny_patch16_224", ModelOptions(img_size=16, num_classes=3, model_args=TINY_VIT))
    save_file(dict(model.module.state_dict()), str(tmp_path / "w.safetensors"))
    with pytest.raises(SpecError, match="does not fit the model.*--num-classes"):
        load_model("timm:vit_tiny_patch16_224", ModelOptions(img_size=16, num_classes=4, model_args=TINY_VIT,
                                                            checkpoint=tmp_path / "w.safetensors"))
    with pytest.raises(SpecError, match="only .safetensors checkpoints"):
        load_model("timm:vit_tiny_patch16_224", ModelOptions(checkpoint=tmp_path / "w.pth"))


def test_unknown_timm_name_suggests_close_ones():
    with pytest.raises(SpecError, match="timm has no model 'vit_tiny'; similar: .*vit_tiny"):
        load_model("timm:vit_tiny")


FACTORY = '''
import torch
class Net(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(4, width)
    def forward(self, x):
        return self.fc(x)
def build(width=3):
    return Net(width)
def not_a_model():
    return 42
'''


def test_py_factory_from_a_module_or_a_file_gets_the_model_args(tmp_path, monkeypatch):
    (tmp_path / "my_models_for_specs.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    by_module = load_model("py:my_models_for_specs:build", ModelOptions(model_args={"width": 7}))
    by_file = load_model(f"py:{tmp_path / 'my_models_for_specs.py'}:build")
    assert by_module.module.fc.out_features == 7 and by_file.module.fc.out_features == 3
    assert not by_module.data.takes_dict
    with pytest.raises(SpecError, match="returned int, not a torch.nn.Module"):
        load_model(f"py:{tmp_path / 'my_models_for_specs.py'}:not_a_model")
    with pytest.raises(SpecError, match="has no callable 'missing'"):
        load_model(f"py:{tmp_path / 'my_models_for_specs.py'}:missing")


@pytest.mark.parametrize("spec", ["bert", "hf:", "onnx:model.onnx", "py:nofactory"])
def test_malformed_model_specs_say_which_forms_exist(spec):
    with pytest.raises(SpecError, match="hf:|py:MODULE:FACTORY"):
        load_model(spec)


def test_options_of_another_model_kind_are_refused():
    with pytest.raises(SpecError, match="--num-labels applies to hf: models, not timm: ones"):
        load_model("timm:vit_tiny_patch16_224", ModelOptions(num_labels=3))
    with pytest.raises(SpecError, match="--checkpoint applies to timm: models, not hf: ones"):
        load_model("hf:/x", ModelOptions(checkpoint=Path("w.safetensors")))


def test_model_args_are_read_as_json_when_they_parse():
    assert parse_model_args(["depth=2", "drop=0.1", "name=small", "flag=true", "dims=[1,2]"]) == {
        "depth": 2, "drop": 0.1, "name": "small", "flag": True, "dims": [1, 2]}
    with pytest.raises(SpecError, match="is not KEY=VALUE"):
        parse_model_args(["depth"])


def test_default_batch_follows_the_model_inputs(bert_dir):
    hf = load_model(f"hf:{bert_dir}")
    batch = default_batch(hf)
    assert list(batch) == ["input_ids"] and int(batch["input_ids"].max()) < len(VOCAB)
    vit = load_model("timm:vit_tiny_patch16_224", ModelOptions(img_size=16, model_args=TINY_VIT))
    (x,) = default_batch(vit)
    assert x.shape[1:] == (3, 16, 16)
    assert vit.module(x).shape[0] == x.shape[0]


# ---- synthetic data ---------------------------------------------------------------------------

def test_synthetic_spec_gives_shapes_dtypes_and_ranges():
    specs = parse_synthetic("input_ids=4x16:int<100, mask=4x16:ones ,labels=4:int<3,x=4x2:float")
    assert [(s.name, s.shape, s.high) for s in specs] == [
        ("input_ids", (4, 16), 100), ("mask", (4, 16), -1), ("labels", (4,), 3), ("x", (4, 2), 0)]
    fmt = DataFormat(takes_dict=True)
    batches = load_batches(fmt, synthetic="input_ids=4x16:int<100,mask=4x16:ones,labels=4:int<3", count=3)
    assert len(batches) == 3
    for b in batches:
        assert b["input_ids"].shape == (4, 16) and b["input_ids"].dtype == torch.long
        assert 0 <= int(b["input_ids"].min()) and int(b["input_ids"].max()) < 100
        assert torch.equal(b["mask"], torch.ones(4, 16, dtype=torch.long))
        assert int(b["labels"].max()) < 3
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    again = load_batches(fmt, synthetic="input_ids=4x16:int<100,mask=4x16:ones,labels=4:int<3", count=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


@pytest.mark.parametrize("text, problem", [
    ("x=8x3,y=4:int<10", "share the first"), ("x=8x3,x=8", "distinct"), ("x=8x0", "positive"),
    ("x=8:int<0", "positive"), ("x=8:long", "NAME=DIMS"), ("x:8", "NAME=DIMS"), ("", "empty")])
def test_bad_synthetic_specs_are_explained(text, problem):
    with pytest.raises(SpecError, match=problem):
        parse_synthetic(text)


# ---- named tensors -> batches -----------------------------------------------------------------

def test_named_tensors_map_to_inputs_and_target():
    x, y, m = torch.randn(4, 3), torch.arange(4), torch.ones(4, 3)
    assert to_batch({"x": x, "y": y}, takes_dict=False)[1] is y
    assert to_batch({"y": y, "x": x}, takes_dict=False)[0] is x
    inputs, target = to_batch({"a": x, "b": m, "target": y}, takes_dict=False)
    assert inputs == {"a": x, "b": m} and target is y
    assert to_batch({"x": x}, takes_dict=False) == (x,)
    assert to_batch({"input_ids": x, "labels": y}, takes_dict=True) == {"input_ids": x, "labels": y}
    with pytest.raises(SpecError, match="several target tensors"):
        to_batch({"x": x, "y": y, "labels": y}, takes_dict=False)
    with pytest.raises(SpecError, match="only a target"):
        to_batch({"labels": y}, takes_dict=False)


def test_batches_are_consecutive_rows():
    samples = {"x": torch.arange(10.0)[:, None], "y": torch.arange(10)}
    batches = split_batches(samples, 4, takes_dict=False)
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(split_batches(samples, 4, takes_dict=False, count=2)) == 2
    assert [len(b[1]) for b in split_batches(samples, 4, takes_dict=False, drop_last=True)] == [4, 4]
    assert [len(b[1]) for b in split_batches(samples, 16, takes_dict=False, drop_last=True)] == [10]


# ---- files ------------------------------------------------------------------------------------

PLAIN = DataFormat(takes_dict=False)


def test_safetensors_and_npz_files_give_the_same_tensors(tmp_path):
    x, y = np.random.default_rng(0).normal(size=(6, 3)), np.arange(6)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    save_file({"x": torch.from_numpy(x).float(), "y": torch.from_numpy(y)}, str(tmp_path / "d.safetensors"))
    a, b = read_samples(tmp_path / "d.npz", PLAIN), read_samples(tmp_path / "d.safetensors", PLAIN)
    assert a["x"].dtype == torch.float32  # numpy's float64 default would not run through a float32 model
    for k in ("x", "y"):
        assert torch.equal(a[k], b[k])


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SpecError, match="object arrays, which would need unpickling"):
        read_samples(tmp_path / "d.npz", PLAIN)


def test_tensors_of_different_lengths_are_refused(tmp_path):
    save_file({"x": torch.zeros(6, 3), "y": torch.zeros(5)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(SpecError, match="same number of rows"):
        read_samples(tmp_path / "d.safetensors", PLAIN)
    with pytest.raises(SpecError, match="unknown data format '.csv'"):
        (tmp_path / "d.csv").write_text("1,2")
        read_samples(tmp_path / "d.csv", PLAIN)


def test_jsonl_is_tokenized_with_the_model_tokenizer(bert_dir, tmp_path):
    import transformers as tf

    lines = [{"text": "good movie", "label": 1}, {"text": "very bad plot the movie", "label": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    samples = read_samples(tmp_path / "d.jsonl", load_model(f"hf:{bert_dir}").data, DataOptions(max_length=5))
    expected = tf.AutoTokenizer.from_pretrained(bert_dir)([r["text"] for r in lines], padding=True,
                                                          truncation=True, max_length=5, return_tensors="pt")
    assert torch.equal(samples["input_ids"], expected["input_ids"]) and samples["input_ids"].shape == (2, 5)
    assert samples["labels"].tolist() == [1, 0]
    assert VOCAB.index("good") in samples["input_ids"][0].tolist()  # real words, not [UNK]


def test_causal_lm_text_labels_are_the_ids_with_padding_ignored(bert_dir, tmp_path):
    (tmp_path / "d.txt").write_text("good movie\nvery bad plot\n")
    samples = read_samples(tmp_path / "d.txt", DataFormat(True, tokenizer_dir=bert_dir, causal_lm=True))
    pad = samples["attention_mask"] == 0
    assert pad.any()
    assert torch.equal(samples["labels"][~pad], samples["input_ids"][~pad])
    assert (samples["labels"][pad] == -100).all()


def test_text_without_a_tokenizer_is_refused(tmp_path):
    (tmp_path / "d.txt").write_text("good movie\n")
    with pytest.raises(SpecError, match="text data needs a tokenizer"):
        read_samples(tmp_path / "d.txt", PLAIN)


def test_image_folder_gives_normalised_images_labelled_by_folder(tmp_path):
    from PIL import Image

    colours = {"cat": [(255, 0, 0), (200, 0, 0)], "dog": [(0, 0, 255), (0, 0, 100), (0, 0, 50)]}
    for cls, cs in colours.items():
        (tmp_path / cls).mkdir()
        for i, c in enumerate(cs):
            Image.new("RGB", (10, 7), c).save(tmp_path / cls / f"{i}.png")
    samples = read_samples(tmp_path, PLAIN, DataOptions(img_size=4))
    assert samples["x"].shape == (5, 3, 4, 4)
    # each image is one colour: its red channel says which folder it came from
    red = samples["x"][:, 0].mean(dim=(1, 2))
    assert samples["y"].tolist() == [0 if r > 0.5 else 1 for r in red.tolist()]
    assert sorted(round(b * 255) for b in samples["x"][:, 2].mean(dim=(1, 2)).tolist()) == [0, 0, 50, 100, 255]
    hf = read_samples(tmp_path, DataFormat(takes_dict=True, image_size=4))
    assert set(hf) == {"pixel_values", "labels"}
    with pytest.raises(SpecError, match="pass --img-size"):
        read_samples(tmp_path, PLAIN)
