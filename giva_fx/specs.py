"""Resolve command-line specs into a model and sample batches, offline and without unpickling.

MODEL specs:

    hf:DIR          a Hugging Face model directory (config.json + *.safetensors weights)
    hf:CONFIG.json  a Hugging Face config: the model is built with random weights (seed 0)
    timm:NAME       timm.create_model(NAME, pretrained=False), weights from an optional checkpoint
    py:MOD:FN       FN(**model_args) from the module MOD (dotted name, or a path to a .py file):
                    this runs that code

Data specs: a ``.safetensors`` or ``.npz`` file of named tensors (one row per sample), a ``.txt``
(one text per line) or ``.jsonl`` file (``{"text": ..., "label": ...}`` per line) tokenized with
the model directory's tokenizer, or an image folder (``DIR/<class>/<image>``). ``synthetic`` specs
describe one batch of random tensors, ``name=DIMS[:KIND]`` joined by commas, e.g.
``input_ids=4x16:int<100,labels=4:int<3`` or ``x=8x3x32x32,y=8:int<10``; KIND is ``float``
(standard normal, the default), ``int<N`` (uniform in [0, N)) or ``ones`` (int64 ones, for
attention masks).

How named tensors become a batch: Hugging Face models take the whole dict as keyword inputs
(``labels`` makes them compute their loss). Other models take a tensor named ``labels``,
``target`` or ``y`` as the loss target, and the remaining tensor as their input (several
remaining tensors are passed as keyword inputs by name).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from giva_fx.errors import ConfigError

TARGET_NAMES = ("labels", "target", "y")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MODEL_SEED = 0  # random weights are seeded, so one spec always builds the same model

# --task -> the transformers auto class that builds the model
HF_TASKS: Mapping[str, str] = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "image-classification": "AutoModelForImageClassification",
    "base": "AutoModel",
}


class SpecError(ConfigError):
    """A MODEL or data spec cannot be resolved: the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ModelOptions:
    """How to build the model a spec names; each field is documented by its CLI option."""

    task: str | None = None
    num_labels: int | None = None
    num_classes: int | None = None
    img_size: int | None = None
    checkpoint: Path | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataFormat:
    """What turning data into batches needs to know about the model they feed."""

    takes_dict: bool  # Hugging Face models take named tensors as keyword inputs
    tokenizer_dir: Path | None = None  # for text data
    causal_lm: bool = False  # text labels are the input ids themselves
    image_size: int | None = None  # image folders are resized to this
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # and normalised with these
    std: tuple[float, ...] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class LoadedModel:
    """A resolved model and the format of its batches."""

    module: nn.Module
    spec: str
    data: DataFormat

    def describe(self) -> str:
        params = sum(p.numel() for p in self.module.parameters())
        return f"{type(self.module).__name__} from {self.spec} ({params:,} parameters)"


# ---------------------------------------------------------------------------------------------
# models


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> kwargs; VALUE is read as JSON when it parses (8, 0.1, true, [1,2])."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SpecError(f"{item!r} is not KEY=VALUE (e.g. depth=2 or embed_dim=48)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_model(spec: str, options: ModelOptions = ModelOptions()) -> LoadedModel:
    """Build the model a MODEL spec names, in eval mode."""
    scheme, sep, rest = spec.partition(":")
    loaders = {"hf": _load_hf, "timm": _load_timm, "py": _load_py}
    if not sep or scheme not in loaders or not rest:
        raise SpecError(f"{spec!r} is not a model spec; use hf:DIR, hf:CONFIG.json, timm:NAME or "
                        "py:MODULE:FACTORY")
    only = {"--task": (options.task, "hf"), "--num-labels": (options.num_labels, "hf"),
            "--num-classes": (options.num_classes, "timm"), "--checkpoint": (options.checkpoint, "timm")}
    for flag, (value, owner) in only.items():
        if value is not None and scheme != owner:
            raise SpecError(f"{flag} applies to {owner}: models, not {scheme}: ones; leave it out or use "
                            "--model-arg KEY=VALUE for the model's own arguments")
    loaded = loaders[scheme](rest, options)
    loaded.module.eval()
    return loaded


def _hf_class(config: Any, task: str | None) -> Any:
    import transformers

    if task is not None:
        if task not in HF_TASKS:
            raise SpecError(f"unknown --task {task!r}; choose one of {', '.join(HF_TASKS)}")
        return getattr(transformers, HF_TASKS[task])
    for arch in getattr(config, "architectures", None) or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    raise SpecError(f"the config names no known architecture; pass --task ({', '.join(HF_TASKS)})")


def _load_hf(rest: str, options: ModelOptions) -> LoadedModel:
    import transformers

    path = Path(rest).expanduser()
    overrides = dict(options.model_args)
    if options.num_labels is not None:  # a head of another size: drop the saved label names too
        overrides["id2label"] = {i: f"LABEL_{i}" for i in range(options.num_labels)}
        overrides["label2id"] = {f"LABEL_{i}": i for i in range(options.num_labels)}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(f"{path} has no config.json; pass a directory written by save_pretrained()")
        if not any(path.glob("*.safetensors")):
            raise SpecError(f"{path} has no *.safetensors weights (only safetensors are loaded); "
                            "re-save with save_pretrained(), or pass hf:CONFIG.json for random weights")
        config = transformers.AutoConfig.from_pretrained(path, **overrides)
        cls = _hf_class(config, options.task)
        # a new --num-labels head cannot take the saved one's weights: it starts fresh
        model = cls.from_pretrained(path, config=config, use_safetensors=True,
                                    ignore_mismatched_sizes=options.num_labels is not None)
        hf_dir: Path | None = path
    elif path.is_file():
        try:
            raw = json.loads(path.read_text())
            config = transformers.AutoConfig.for_model(raw.pop("model_type"), **{**raw, **overrides})
        except (json.JSONDecodeError, KeyError, ValueError) as exc:
            raise SpecError(f"{path} is not a Hugging Face config JSON with a model_type ({exc})") from exc
        cls = _hf_class(config, options.task)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(MODEL_SEED)
            model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        hf_dir = path.parent if (path.parent / "tokenizer_config.json").is_file() else None
    else:
        raise SpecError(f"{path} does not exist; pass a model directory or a config JSON")
    return LoadedModel(model, f"hf:{rest}", _hf_format(model, hf_dir))


def _hf_format(model: nn.Module, tokenizer_dir: Path | None) -> DataFormat:
    size = getattr(getattr(model, "config", None), "image_size", None)
    return DataFormat(True, tokenizer_dir, type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")),
                      size if isinstance(size, int) else None)


def _load_timm(name: str, options: ModelOptions) -> LoadedModel:
    import timm

    kwargs = dict(options.model_args)
    if options.num_classes is not None:
        kwargs["num_classes"] = options.num_classes
    if options.img_size is not None:
        kwargs["img_size"] = options.img_size
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise SpecError(f"timm has no model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:
            raise SpecError(f"timm:{name} does not take {sorted(kwargs)}: {exc}") from exc
    if options.checkpoint is not None:
        _load_checkpoint(model, options.checkpoint)
    cfg = model.pretrained_cfg or {}
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg.get("input_size", (0, 0, 0))[1:]
    return LoadedModel(model, f"timm:{name}", DataFormat(False, image_size=size[-1] or None,
                                                         mean=tuple(cfg.get("mean", (0.0,) * 3)),
                                                         std=tuple(cfg.get("std", (1.0,) * 3))))


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise SpecError(f"--checkpoint {path}: only .safetensors checkpoints are loaded (nothing is unpickled)")
    if not path.is_file():
        raise SpecError(f"--checkpoint {path} does not exist")
    state = load_file(str(path))
    own = model.state_dict()
    problems = ([f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
                + [f"{k} is {tuple(v.shape)}, not {tuple(own[k].shape)}" for k, v in state.items()
                   if k in own and v.shape != own[k].shape])
    if problems:
        raise SpecError(f"--checkpoint {path} does not fit the model ({'; '.join(problems[:3])}); check "
                        "--num-classes/--img-size/--model-arg")
    model.load_state_dict(state)


def _load_py(rest: str, options: ModelOptions) -> LoadedModel:
    module_name, sep, factory_name = rest.rpartition(":")
    if not sep or not module_name or not factory_name.isidentifier():
        raise SpecError(f"py:{rest} is not py:MODULE:FACTORY (e.g. py:mypkg.models:build)")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise SpecError(f"py:{rest}: {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: modules next to the user
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise SpecError(f"py:{rest}: cannot import {module_name!r} ({exc}); run from the directory "
                            "that holds it or install it") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise SpecError(f"py:{rest}: {module_name} has no callable {factory_name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_SEED)
        model = factory(**options.model_args)
    if not isinstance(model, nn.Module):
        raise SpecError(f"py:{rest} returned {type(model).__name__}, not a torch.nn.Module")
    return LoadedModel(model, f"py:{rest}", _hf_format(model, None) if _is_hf(model) else DataFormat(False))


def _is_hf(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a model of that library means it is imported
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a synthetic batch: `shape`, and `high` for ints in [0, high) (0: float, -1: ones)."""

    name: str
    shape: tuple[int, ...]
    high: int = 0

    def draw(self, rows: int, generator: torch.Generator) -> torch.Tensor:
        shape = (rows, *self.shape[1:])
        if self.high == -1:
            return torch.ones(shape, dtype=torch.long)
        if self.high:
            return torch.randint(0, self.high, shape, generator=generator)
        return torch.randn(shape, generator=generator)


_SYNTH = re.compile(r"^(?P<name>[A-Za-z_]\w*)=(?P<dims>\d+(?:x\d+)*)(?::(?P<kind>float|ones|int<(?P<high>\d+)))?$")


def parse_synthetic(text: str) -> tuple[TensorSpec, ...]:
    """``input_ids=4x16:int<100,labels=4:int<3`` -> tensor specs sharing one batch size."""
    specs: list[TensorSpec] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = _SYNTH.match(item)
        if m is None:
            raise SpecError(f"{item!r} is not NAME=DIMS[:KIND], e.g. x=8x3x32x32 or y=8:int<10 "
                            "(KIND: float, int<N, ones)")
        shape = tuple(int(d) for d in m["dims"].split("x"))
        high = -1 if m["kind"] == "ones" else int(m["high"] or 0)
        if 0 in shape or (m["high"] is not None and high < 1):
            raise SpecError(f"{item!r}: dimensions and the int bound must be positive")
        specs.append(TensorSpec(m["name"], shape, high))
    if not specs:
        raise SpecError("the synthetic spec is empty; e.g. x=8x3x32x32,y=8:int<10")
    if len({s.shape[0] for s in specs}) > 1 or len({s.name for s in specs}) < len(specs):
        raise SpecError(f"{text!r}: tensor names must be distinct and share the first (batch) dimension")
    return tuple(specs)


def synthetic_samples(text: str, count: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """`count` batches' worth of random rows for a synthetic spec, and its batch size."""
    specs = parse_synthetic(text)
    generator = torch.Generator().manual_seed(seed)
    rows = specs[0].shape[0]
    return {s.name: s.draw(rows * count, generator) for s in specs}, rows


@dataclass(frozen=True)
class DataOptions:
    """How files become tensors; each field is documented by its CLI option."""

    max_length: int = 128
    img_size: int | None = None
    seed: int = 0


def read_samples(path: Path, fmt: DataFormat, options: DataOptions = DataOptions()) -> dict[str, torch.Tensor]:
    """Named tensors with one row per sample from a data file or folder."""
    if not path.exists():
        raise SpecError(f"{path} does not exist")
    if path.is_dir():
        samples = _image_folder(path, fmt, options)
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        samples = load_file(str(path))
    elif path.suffix == ".npz":
        samples = _npz(path)
    elif path.suffix in (".txt", ".jsonl"):
        samples = _text(path, fmt, options)
    else:
        raise SpecError(f"{path}: unknown data format {path.suffix!r}; use .safetensors, .npz, .txt, "
                        ".jsonl or an image folder")
    if not samples:
        raise SpecError(f"{path} holds no tensors")
    rows = {name: t.shape[0] if t.dim() else 0 for name, t in samples.items()}
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise SpecError(f"{path}: every tensor needs the same number of rows (first dim), got {rows}")
    return samples


def _npz(path: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:
        raise SpecError(f"{path} holds object arrays, which would need unpickling; save plain "
                        "numeric arrays") from exc
    # float64 is numpy's default; models run in float32
    return {k: torch.from_numpy(v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in arrays.items()}


def _text(path: Path, fmt: DataFormat, options: DataOptions) -> dict[str, torch.Tensor]:
    if fmt.tokenizer_dir is None or not (fmt.tokenizer_dir / "tokenizer_config.json").is_file():
        raise SpecError(f"{path}: text data needs a tokenizer and none was found; use an hf: directory "
                        "saved with its tokenizer (or name one with --tokenizer), or tensor data")
    import transformers

    texts: list[str] = []
    labels: list[int] = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            texts.append(line)
            continue
        try:
            record = json.loads(line)
            texts.append(str(record["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SpecError(f"{path}:{i} is not a JSON object with a \"text\" field") from exc
        if "label" in record:
            labels.append(int(record["label"]))
    if labels and len(labels) != len(texts):
        raise SpecError(f"{path}: {len(labels)} of {len(texts)} lines have a \"label\"; label all or none")
    tokenizer = transformers.AutoTokenizer.from_pretrained(fmt.tokenizer_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, padding=True, truncation=True, max_length=options.max_length, return_tensors="pt")
    samples = dict(enc)
    if fmt.causal_lm:
        samples["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    elif labels:
        samples["labels"] = torch.tensor(labels)
    return samples


def _image_folder(path: Path, fmt: DataFormat, options: DataOptions) -> dict[str, torch.Tensor]:
    import numpy as np
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((path / name).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SpecError(f"{path} is not an image folder: expected {path}/<class>/<image> files")
    size = options.img_size or fmt.image_size
    if size is None:
        raise SpecError(f"{path}: cannot tell the model's image size; pass --img-size")
    mean, std = torch.tensor(fmt.mean).view(3, 1, 1), torch.tensor(fmt.std).view(3, 1, 1)
    images = []
    for f, _ in files:
        with Image.open(f) as img:
            pixels = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
        images.append((torch.from_numpy(pixels).permute(2, 0, 1) / 255.0 - mean) / std)
    # class folders are read in order: shuffle (seeded) so every batch mixes classes
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(options.seed))
    x, y = torch.stack(images)[order], torch.tensor([c for _, c in files])[order]
    return {"pixel_values": x, "labels": y} if fmt.takes_dict else {"x": x, "y": y}


def to_batch(named: Mapping[str, torch.Tensor], takes_dict: bool) -> Any:
    """Named tensors -> one batch as `giva_fx.adapt` takes it (see the module docstring)."""
    if takes_dict:
        return dict(named)
    targets = [n for n in TARGET_NAMES if n in named]
    if len(targets) > 1:
        raise SpecError(f"the data has several target tensors {targets}; keep one of {TARGET_NAMES}")
    inputs = {k: v for k, v in named.items() if k not in targets}
    if not inputs:
        raise SpecError(f"the data has only a target ({targets[0]}); add the model's input tensor")
    x = next(iter(inputs.values())) if len(inputs) == 1 else inputs
    return (x, named[targets[0]]) if targets else (x,)


def split_batches(samples: Mapping[str, torch.Tensor], batch_size: int, takes_dict: bool,
                  count: int | None = None, drop_last: bool = False) -> list[Any]:
    """Consecutive `batch_size`-row batches, the first `count` of them. The last may be short, unless
    `drop_last` (when there are enough rows for one full batch)."""
    if batch_size < 1:
        raise SpecError(f"the batch size must be positive, got {batch_size}")
    rows = next(iter(samples.values())).shape[0]
    if drop_last and rows >= batch_size:
        rows -= rows % batch_size
    starts = range(0, rows, batch_size)[:count]
    return [to_batch({k: v[s:s + batch_size] for k, v in samples.items()}, takes_dict) for s in starts]


def default_batch(model: LoadedModel, rows: int = 2, seq: int = 16) -> Any:
    """A made-up batch of the model's own input shape (no target), for looking at its graph."""
    generator = torch.Generator().manual_seed(MODEL_SEED)
    config = getattr(model.module, "config", None)
    size = model.data.image_size
    if model.data.takes_dict:
        name = getattr(model.module, "main_input_name", "input_ids")
        if name == "input_ids" and getattr(config, "vocab_size", None):
            return {name: torch.randint(0, config.vocab_size, (rows, seq), generator=generator)}
        if name == "pixel_values" and size:
            return {name: torch.randn(rows, getattr(config, "num_channels", 3), size, size, generator=generator)}
    elif size:
        return (torch.randn(rows, 3, size, size, generator=generator),)
    raise SpecError(f"cannot make up an input for {model.spec}")


def trainer_format(artifacts_dir: Path, *, tokenizer_dir: Path | None = None, image_size: int | None = None,
                   mean: tuple[float, ...] = (0.0, 0.0, 0.0), std: tuple[float, ...] = (1.0, 1.0, 1.0)) -> DataFormat:
    """The batch format of ONNX Runtime training artifacts: graph inputs named after keywords mean dict
    batches. Text is tokenized with `tokenizer_dir`, as a causal LM when its config.json says so."""
    from giva_fx.export.ort_training import ArtifactsInfo

    info = ArtifactsInfo.read(artifacts_dir)
    causal = False
    if tokenizer_dir is not None and (tokenizer_dir / "config.json").is_file():
        arch = (json.loads((tokenizer_dir / "config.json").read_text()).get("architectures") or [""])[0]
        causal = arch.endswith(("ForCausalLM", "LMHeadModel"))
    return DataFormat(any(isinstance(s.key, str) for s in info.inputs), tokenizer_dir, causal, image_size, mean, std)


def load_batches(fmt: DataFormat, *, data: str | None = None, synthetic: str | None = None,
                 batch_size: int = 16, count: int | None = None, drop_last: bool = False,
                 options: DataOptions = DataOptions()) -> list[Any]:
    """Batches in format `fmt` from a data file/folder or a synthetic spec (exactly one of them).

    A synthetic spec gives its own batch size and draws `count` (default 1) distinct batches.
    `drop_last` leaves out a short last batch (training steps then all see `batch_size` rows).
    """
    if (data is None) == (synthetic is None):
        raise SpecError("give the data as a file/folder or as a synthetic spec (exactly one)")
    if synthetic is not None:
        samples, batch_size = synthetic_samples(synthetic, count or 1, options.seed)
    else:
        samples = read_samples(Path(data).expanduser(), fmt, options)
    return split_batches(samples, batch_size, fmt.takes_dict, count, drop_last)
