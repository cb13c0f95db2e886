"""Trainable parameters and adapt() time of GiVA on timm vision models, conv+linear vs linear only.

For each model (random weights, `pretrained=False`) this adapts twice, with kinds=("linear", "conv")
and kinds=("linear",), and writes a Markdown table to bench/results/conv_counts.md: base size,
GiVA trainable parameters per selection, what a LoRA adapter of the same ranks on the same ops
would train (r * (in + out), with in = in/groups * prod(kernel) for a conv), adapt() time split by
stage, and every skipped op grouped by reason.

    OMP_NUM_THREADS=1 python bench/conv_counts.py [--size 64] [--batch 4] [--rank 8]
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings
from collections import Counter
from pathlib import Path

import timm
import torch

import giva_fx
from giva_fx.files import atomic_file

MODELS = ("resnet18", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050", "vit_tiny_patch16_224")
RESULTS = Path(__file__).parent / "results" / "conv_counts.md"


def _model(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"img_size": size} if name.startswith("vit") else {}
    return timm.create_model(name, pretrained=False, **extra).eval()


def _adapt(model: torch.nn.Module, batch: tuple, rank: int, kinds: tuple[str, ...]):
    """(adapted model or None when no op of these kinds is adaptable, wall-clock seconds)."""
    start = time.perf_counter()
    try:
        adapted = giva_fx.adapt(model, batch, rank=rank, kinds=kinds, progress=False)
    except giva_fx.MatchError:
        return None, time.perf_counter() - start
    return adapted, time.perf_counter() - start


def measure(name: str, size: int, batch_size: int, rank: int) -> dict:
    model = _model(name, size)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(batch_size, 3, size, size, generator=gen),
             torch.randint(0, model.num_classes, (batch_size,), generator=gen))
    both, seconds = _adapt(model, batch, rank, ("linear", "conv"))
    linear_only, _ = _adapt(model, batch, rank, ("linear",))
    s = giva_fx.summary(both)
    adapters = both.adapters()
    convs = [op for op in both.found.ops if op.kind == "conv"]
    return {
        "name": name, "base": s.base_params, "summary": s, "seconds": seconds, "report": both.report,
        "convs": len(convs), "linears": len(s.ops) - len(convs),
        "grouped": sum(op.conv.groups > 1 for op in convs),
        "dense": sum(adapters[op.weight_name].dense for op in convs),
        "linear_only": giva_fx.summary(linear_only).adapter_params if linear_only else 0,
        "skipped": Counter(f"{r.kind}: {r.reason}" for r in s.skipped),
    }


def render(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# GiVA on timm vision models: conv+linear vs linear only",
        "",
        f"`OMP_NUM_THREADS=1 python bench/conv_counts.py --size {args.size} --batch {args.batch} --rank {args.rank}`",
        f"(torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); random weights, {args.size}x{args.size} inputs, one profiling "
        f"batch of {args.batch}, rank {args.rank}, init Vr).",
        "",
        "| model | base params | adapted ops (conv / grouped / linear) | GiVA conv+linear | GiVA linear only "
        "| LoRA same ops & ranks | GiVA / LoRA | adapt() s | capture / profile / bases / rewrite s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s, rep = r["summary"], r["report"]
        lines.append(
            f"| {r['name']} | {r['base']:,} | {r['convs']} / {r['grouped']} / {r['linears']} | "
            f"{s.adapter_params:,} | {r['linear_only']:,} | {s.lora_equivalent:,} | "
            f"{s.adapter_params / s.lora_equivalent:.1%} | {r['seconds']:.1f} | "
            f"{rep.capture_s:.1f} / {rep.profile_s:.2f} / {rep.bases_s:.2f} / {rep.rewrite_s:.2f} |")
    lines += [
        "",
        "GiVA trains lambda_s (r) and lambda_o (out) per op; LoRA would train r * (in + out), with in = "
        "in/groups * prod(kernel) for a conv. \"grouped\" counts adapted convs with groups > 1 (depthwise "
        "included). Conv adapters in the dense form (one conv with dW, where that costs fewer multiply-adds "
        "than conv_A then conv_B): " + ", ".join(f"{r['name']} {r['dense']}" for r in rows) + ".",
        "\"GiVA linear only\" is 0 where the only linear op is the classifier head, which is skipped by default.",
        "",
        "## Skipped ops",
        "",
        "| model | count | kind: reason |",
        "|---|---:|---|",
    ]
    for r in rows:
        lines += [f"| {r['name']} | {n} | {reason} |" for reason, n in sorted(r["skipped"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # rank clamps on small ops are expected here
    measure("resnet18", 32, 2, args.rank)  # warm-up: the first export pays one-time start-up costs
    rows = [measure(name, args.size, args.batch, args.rank) for name in MODELS]
    text = render(rows, args)
    with atomic_file(RESULTS) as tmp:
        tmp.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
