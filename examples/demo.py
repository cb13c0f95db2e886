"""giva-fx demo: adapt a small pretrained ViT to rotated digits, offline, in a few minutes.

The base model (examples/assets/digits_vit.safetensors, made by examples/pretrain.py from
scikit-learn's bundled digits) was pretrained on upright digits; turned by 90 degrees, the same
digits defeat it. GiVA adapts every linear and conv op of it, training only two small vectors per op.

    python examples/demo.py [--steps 300] [--rank 8] [--init Vr] [--lr 0.03]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import giva_fx  # noqa: E402
from models import ASSETS_DIR, load_base  # noqa: E402
from offline_data import digits_shifted  # noqa: E402


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--init", default="Vr", choices=giva_fx.INIT_MODES)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--assets", type=Path, default=ASSETS_DIR)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = load_base("digits_vit", args.assets)
    data = digits_shifted()
    before = accuracy(model, data.x_test, data.y_test)
    print(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters, pretrained on upright digits")
    print(f"test accuracy on rotated digits before adapting: {before:.1%}")

    start = time.perf_counter()
    adapted = giva_fx.adapt(model, (data.x_train[:256], data.y_train[:256]), rank=args.rank, init=args.init)
    print(f"\nadapt() took {time.perf_counter() - start:.1f} s "
          f"(capture {adapted.report.capture_s:.1f} s, profile {adapted.report.profile_s:.1f} s, "
          f"SVD {adapted.report.bases_s:.1f} s, rewrite {adapted.report.rewrite_s:.2f} s)\n")
    table = giva_fx.summary(adapted)
    print(table, "\n")

    params = giva_fx.trainable_parameters(adapted)
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=0.0, fused=True)  # one kernel for all vectors
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    adapted.train()
    bar = tqdm(range(args.steps), desc="fine-tuning the adapter vectors")
    for _ in bar:
        idx = torch.randint(0, len(data.x_train), (args.batch,), generator=gen)
        loss = F.cross_entropy(adapted(data.x_train[idx]), data.y_train[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    after = accuracy(adapted, data.x_test, data.y_test)

    args.out.mkdir(parents=True, exist_ok=True)
    adapter_file = args.out / "adapter.safetensors"
    giva_fx.save_adapter(adapted, adapter_file)
    merged = giva_fx.merge(adapted, model)
    merged_acc = accuracy(merged, data.x_test, data.y_test)

    print(f"\ntest accuracy on rotated digits: {before:.1%} -> {after:.1%} after {args.steps} steps "
          f"(merged into the original model: {merged_acc:.1%})")
    print(f"trainable parameters: {table.trainable:,} GiVA r={args.rank}  vs  {table.lora_equivalent:,} "
          f"LoRA at the same rank ({table.lora_equivalent / table.trainable:.0f}x more)  "
          f"vs  {table.base_params:,} in the base model")
    print(f"adapter file: {adapter_file} ({adapter_file.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
