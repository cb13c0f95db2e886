"""Small base models for the offline tasks, and their safetensors save/load.

Each pretrained base lives in ``assets_dir`` as ``<name>.safetensors`` (weights)
plus ``<name>.json`` (``kind``, constructor ``config`` and pretraining
``metrics``), so :func:`load_base` rebuilds it from the JSON config and loads
the weights without pickle. This module imports nothing from ``giva_fx``.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from safetensors.torch import load_model, save_model
from torch import Tensor, nn

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU stack with two 2x2 max-pools and an MLP head, for 8x8 inputs."""

    def __init__(
        self,
        in_chans: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        hidden: int = 128,
        num_classes: int = 10,
        img_size: int = 8,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size, prev = img_size, in_chans
        for i, ch in enumerate(channels):
            layers += [nn.Conv2d(prev, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU()]
            if i > 0:  # keep full resolution for the first block
                layers.append(nn.MaxPool2d(2))
                size //= 2
            prev = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(prev * size * size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """Randomly initialised model of ``kind`` from constructor ``config``."""
    if kind == "cnn":
        return DigitsCNN(**config)
    if kind == "timm_vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**config)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(**config))
    if kind == "bert_cls":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(**config))
    raise ValueError(f"unknown model kind {kind!r}")


def save_base(
    model: nn.Module,
    name: str,
    kind: str,
    config: dict[str, Any],
    metrics: dict[str, float],
    assets_dir: Path | str = ASSETS_DIR,
) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json``; returns the weights path."""
    assets_dir = Path(assets_dir)
    assets_dir.mkdir(parents=True, exist_ok=True)
    path = assets_dir / f"{name}.safetensors"
    save_model(model, str(path))  # de-duplicates tied weights (GPT-2 lm_head)
    meta = {"name": name, "kind": kind, "config": config, "metrics": metrics}
    (assets_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_base_meta(name: str, assets_dir: Path | str = ASSETS_DIR) -> dict[str, Any]:
    """The JSON next to the weights: ``name``, ``kind``, ``config``, ``metrics``."""
    return json.loads((Path(assets_dir) / f"{name}.json").read_text())


def load_base(name: str, assets_dir: Path | str = ASSETS_DIR) -> nn.Module:
    """Rebuild pretrained base ``name`` from its JSON config, in eval mode.

    Names shipped by ``examples/pretrain.py``: ``digits_vit``, ``digits_cnn``,
    ``char_gpt2``, ``char_bert``. Weights load strictly from safetensors.
    """
    meta = load_base_meta(name, assets_dir)
    model = build_model(meta["kind"], meta["config"])
    load_model(model, str(Path(assets_dir) / f"{name}.safetensors"), strict=True)
    return model.eval()
