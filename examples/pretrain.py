"""Pretrain the small offline base models shipped in ``examples/assets``.

No pretrained weights can be downloaded here, so the demos and benchmarks use a
pretrain-then-fine-tune protocol: each base is trained from a random init on an
in-distribution task from :mod:`offline_data` and then fine-tuned elsewhere on
the shifted task. This script prints both the pretraining metric and the
zero-shot metric on the shifted task, to show that the shift matters.

    python examples/pretrain.py [--out examples/assets] [--quick] [--only NAME ...]

Runs on 2 CPU threads with a fixed seed; every base trains in well under two
minutes (``--quick``: a few seconds, for smoke tests).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from models import ASSETS_DIR, build_model, save_base
from offline_data import (
    CLS_ID,
    DIGITS_CLASSES,
    MASK_ID,
    PAD_ID,
    VOCAB_SIZE,
    char_batches,
    char_corpus_finetune,
    char_corpus_pretrain,
    digits_pretrain,
    digits_shifted,
)

SEED = 0
LM_SEQ_LEN = 128
CLS_SEQ_LEN = 64

VIT_CONFIG = dict(
    img_size=8, patch_size=2, in_chans=1, num_classes=DIGITS_CLASSES,
    embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
)  # fmt: skip
CNN_CONFIG = dict(in_chans=1, channels=[32, 64, 64], hidden=128, num_classes=DIGITS_CLASSES)
GPT2_CONFIG = dict(
    vocab_size=VOCAB_SIZE, n_positions=LM_SEQ_LEN, n_embd=128, n_layer=4, n_head=4,
    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    bos_token_id=PAD_ID, eos_token_id=PAD_ID, pad_token_id=PAD_ID,
)  # fmt: skip
BERT_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=256, max_position_embeddings=CLS_SEQ_LEN, type_vocab_size=1,
    pad_token_id=PAD_ID, num_labels=2,
)  # fmt: skip


def cosine_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over 5% of ``steps``, then cosine decay to zero."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, int], Tensor],
    steps: int,
    lr: float,
    weight_decay: float = 0.01,
) -> None:
    """AdamW + cosine schedule; ``loss_fn(model, step)`` draws its own batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = cosine_schedule(opt, steps)
    model.train()
    for step in range(steps):
        loss = loss_fn(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()


# ------------------------------------------------------------------ digits --


def random_shift(x: Tensor, gen: torch.Generator, max_shift: int = 1) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels (background-padded)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=float(x.min()))
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    return (model(x).argmax(-1) == y).float().mean().item()


def pretrain_digits(
    name: str, kind: str, config: dict[str, Any], steps: int, lr: float, out: Path
) -> None:
    """Train on upright digits (with 1-pixel shifts); report rotated zero-shot."""
    torch.manual_seed(SEED)
    model = build_model(kind, config)
    data, shifted = digits_pretrain(), digits_shifted()
    gen = torch.Generator().manual_seed(SEED)

    def loss_fn(m: nn.Module, step: int) -> Tensor:
        idx = torch.randint(0, len(data.y_train), (64,), generator=gen)
        return F.cross_entropy(m(random_shift(data.x_train[idx], gen)), data.y_train[idx])

    fit(model, loss_fn, steps, lr, weight_decay=0.05)
    metrics = {
        "pretrain_test_acc": accuracy(model, data.x_test, data.y_test),
        "shifted_test_acc_zero_shot": accuracy(model, shifted.x_test, shifted.y_test),
    }
    report(save_base(model, name, kind, config, metrics, out), metrics)


# -------------------------------------------------------------------- text --


@torch.no_grad()
def lm_loss(model: nn.Module, stream: Tensor, max_windows: int = 128) -> float:
    """Mean next-char loss (nats) over consecutive non-overlapping windows."""
    n = min(max_windows, len(stream) // LM_SEQ_LEN)
    batches = stream[: n * LM_SEQ_LEN].view(n, LM_SEQ_LEN).split(32)
    return sum(model(input_ids=b, labels=b).loss.item() for b in batches) / len(batches)


def pretrain_gpt2(steps: int, out: Path) -> None:
    """Character-level causal LM on stdlib code; report loss on docstring prose."""
    torch.manual_seed(SEED)
    model = build_model("gpt2", GPT2_CONFIG)
    (code_tr, code_va), (_, prose_va) = char_corpus_pretrain(), char_corpus_finetune()
    batches = char_batches(code_tr, 16, LM_SEQ_LEN, torch.Generator().manual_seed(SEED))
    fit(model, lambda m, step: m(**next(batches)).loss, steps, lr=3e-3)
    metrics = {
        "pretrain_val_loss": lm_loss(model, code_va),
        "shifted_val_loss_zero_shot": lm_loss(model, prose_va),
    }
    report(save_base(model, "char_gpt2", "gpt2", GPT2_CONFIG, metrics, out), metrics)


def mask_tokens(ids: Tensor, gen: torch.Generator, prob: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT masking of non-special tokens: 80% ``<mask>``, 10% random, 10% kept."""
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & (ids > MASK_ID)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(MASK_ID + 1, VOCAB_SIZE, ids.shape, generator=gen)
    inputs = torch.where(chosen & (action < 0.8), MASK_ID, ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


def cls_windows(stream: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """``n`` random windows of ``stream`` prefixed with ``<cls>``."""
    starts = torch.randint(0, len(stream) - CLS_SEQ_LEN, (n,), generator=gen)
    body = torch.stack([stream[s : s + CLS_SEQ_LEN - 1] for s in starts.tolist()])
    return torch.cat([torch.full((n, 1), CLS_ID), body], dim=1)


@torch.no_grad()
def mlm_accuracy(mlm: nn.Module, stream: Tensor, n: int = 512) -> float:
    """Masked-token accuracy on ``n`` fixed random windows of ``stream``."""
    gen = torch.Generator().manual_seed(SEED + 1)
    inputs, labels = mask_tokens(cls_windows(stream, n, gen), gen)
    pred = mlm(input_ids=inputs).logits.argmax(-1)
    keep = labels != -100
    return (pred[keep] == labels[keep]).float().mean().item()


def pretrain_bert(steps: int, out: Path) -> None:
    """Masked-LM on stdlib code, saved as a sequence classifier (fresh 2-way head).

    The encoder is pretrained; pooler and classifier are seeded random inits, as
    when fine-tuning a BERT checkpoint on ``offline_data.char_classification``.
    """
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(SEED)
    mlm = BertForMaskedLM(BertConfig(**BERT_CONFIG))
    (code_tr, code_va), (_, prose_va) = char_corpus_pretrain(), char_corpus_finetune()
    gen = torch.Generator().manual_seed(SEED)

    def loss_fn(m: nn.Module, step: int) -> Tensor:
        inputs, labels = mask_tokens(cls_windows(code_tr, 32, gen), gen)
        return m(input_ids=inputs, labels=labels).loss

    fit(mlm, loss_fn, steps, lr=1e-3)
    metrics = {
        "pretrain_val_mlm_acc": mlm_accuracy(mlm, code_va),
        "shifted_val_mlm_acc_zero_shot": mlm_accuracy(mlm, prose_va),
    }
    torch.manual_seed(SEED)
    model = build_model("bert_cls", BERT_CONFIG)
    missing, unexpected = model.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("pooler.") for k in missing), (missing, unexpected)
    report(save_base(model, "char_bert", "bert_cls", BERT_CONFIG, metrics, out), metrics)


# -------------------------------------------------------------------- main --


def report(path: Path, metrics: dict[str, float]) -> None:
    """Print the metrics and file size of a saved base."""
    size_kb = path.stat().st_size / 1024
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    print(f"{path.stem}: {shown} [{size_kb:.0f} KB]", flush=True)


#: name -> trainer(step divisor, assets dir); full runs use a divisor of 1.
JOBS: dict[str, Callable[[int, Path], None]] = {
    "digits_vit": lambda k, out: pretrain_digits(
        "digits_vit", "timm_vit", VIT_CONFIG, 2000 // k, 2e-3, out
    ),
    "digits_cnn": lambda k, out: pretrain_digits("digits_cnn", "cnn", CNN_CONFIG, 600 // k, 2e-3, out),
    "char_gpt2": lambda k, out: pretrain_gpt2(400 // k, out),
    "char_bert": lambda k, out: pretrain_bert(400 // k, out),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="assets directory")
    parser.add_argument("--quick", action="store_true", help="1/20 of the steps (smoke test)")
    parser.add_argument("--only", nargs="+", choices=list(JOBS), help="subset to train")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    for name in args.only or JOBS:
        wall, cpu = time.perf_counter(), time.process_time()
        JOBS[name](20 if args.quick else 1, args.out)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU (all threads)", flush=True)


if __name__ == "__main__":
    main()
