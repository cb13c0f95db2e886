"""Adapter file sizes: a GiVA adapter file (save_adapter) vs a PEFT LoRA adapter of the same rank on
the same ops, for the demo-sized model and a BERT-base-sized model.

Models are built from configs with random weights (sizes do not depend on the values): the demo's
digits ViT (timm VisionTransformer, 8x8 inputs, embed 64, depth 4, as in examples/pretrain.py) and
BertForSequenceClassification(BertConfig()) (defaults: 12 layers x 768, 110M parameters). Each is
adapted with default targets at the given rank on one tiny batch; the LoRA adapter is PEFT's own
`save_pretrained` with target_modules = the modules GiVA adapted and the same r. Writes
bench/results/adapter_size.md.

    OMP_NUM_THREADS=1 python bench/adapter_size.py [--rank 8] [--no-bert-base]
"""
from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
import warnings
from pathlib import Path

import peft
import safetensors
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer

import giva_fx
from giva_fx.files import atomic_file
from giva_fx.export.peft_lora import peft_lora

RESULTS = Path(__file__).parent / "results" / "adapter_size.md"
DEMO_VIT = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                mlp_ratio=2.0)


def demo_vit(dtype: torch.dtype) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = VisionTransformer(**DEMO_VIT).to(dtype).eval()
    return model, (torch.randn(8, 1, 8, 8, dtype=dtype), torch.randint(0, 10, (8,)))


def bert_base(dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig()).to(dtype).eval()
    ids = torch.randint(1000, 2000, (2, 16))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}


def parts(path: Path) -> dict[str, int]:
    """Bytes of a GiVA file by content: A, B, vectors (and train= / buffers), and the header."""
    sizes = {"A": 0, "B": 0, "vectors": 0}
    with safetensors.safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no iterator)
            t = f.get_slice(key)
            numel = torch.Size(t.get_shape()).numel()
            nbytes = numel * {"F32": 4, "BF16": 2, "F16": 2, "I64": 8}[t.get_dtype()]
            sizes[key.rsplit(".", 1)[-1] if key.endswith((".A", ".B")) else "vectors"] += nbytes
    sizes["header"] = path.stat().st_size - sum(sizes.values())
    return sizes


def peft_size(model: torch.nn.Module, adapted: giva_fx.GivaModel, rank: int, out: Path) -> int:
    """PEFT's own LoRA adapter file on the modules GiVA adapted, same rank."""
    modules = sorted(name.removesuffix(".weight") for name in adapted.adapters())
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=modules)
    peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(str(out))
    return (out / "adapter_model.safetensors").stat().st_size


def measure(name: str, model: torch.nn.Module, batch, rank: int, tmp: Path) -> dict[str, object]:
    start = time.perf_counter()
    adapted = giva_fx.adapt(model, batch, rank=rank, progress=False)
    adapt_s = time.perf_counter() - start
    with torch.no_grad():  # trained-looking vectors (sizes do not depend on them)
        for p in giva_fx.trainable_parameters(adapted).values():
            p.add_(torch.randn_like(p) * 0.01)
    compact, full, rand = tmp / "adapter.safetensors", tmp / "full.safetensors", tmp / "random.safetensors"
    start = time.perf_counter()
    giva_fx.save_adapter(adapted, compact)
    save_s = time.perf_counter() - start
    giva_fx.save_adapter(adapted, full, compact=False)
    start = time.perf_counter()
    loaded = giva_fx.load_adapter(model, compact, batch)
    load_s = time.perf_counter() - start
    exact = all(torch.equal(getattr(loaded.adapters()[n], k), getattr(a, k))
                for n, a in adapted.adapters().items() for k in ("A", "B", "lambda_s", "lambda_o"))
    random_init = giva_fx.adapt(model, batch, rank=rank, init="random", progress=False)
    giva_fx.save_adapter(random_init, rand)
    peft_lora(adapted, model, tmp / "export")
    summary = giva_fx.summary(adapted)
    return {
        "name": name, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "base": summary.base_params, "ops": len(summary.ops), "compact": compact.stat().st_size,
        "parts": parts(compact), "full": full.stat().st_size, "random": rand.stat().st_size,
        "peft": peft_size(model, adapted, rank, tmp / "peft"),
        "export": (tmp / "export" / "adapter_model.safetensors").stat().st_size,
        "exact": exact, "adapt_s": adapt_s, "save_s": save_s, "load_s": load_s,
    }


def table(rows: list[dict[str, object]]) -> str:
    head = ("model", "dtype", "base params", "adapted ops", "GiVA file (Vr, default)", "A / B / vectors / header",
            "GiVA, B stored", "GiVA init=random", "PEFT LoRA same r", "GiVA / LoRA", "giva LoRA export")
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r["parts"]
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['base']:,} | {r['ops']} | {r['compact']:,} | "
            f"{p['A']:,} / {p['B']:,} / {p['vectors']:,} / {p['header']:,} | {r['full']:,} | {r['random']:,} | "
            f"{r['peft']:,} | {r['compact'] / r['peft']:.0%} | {r['export']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--no-bert-base", action="store_true", help="skip the 110M-parameter model")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    cases = [("demo ViT", demo_vit, torch.float32), ("demo ViT", demo_vit, torch.bfloat16)]
    if not args.no_bert_base:
        cases += [("BERT-base", bert_base, torch.float32), ("BERT-base", bert_base, torch.bfloat16)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, factory, dtype) in enumerate(cases):
            model, batch = factory(dtype)
            out = Path(tmp) / str(i)
            out.mkdir()
            r = measure(name, model, batch, args.rank, out)
            rows.append(r)
            print(f"{name} {r['dtype']}: GiVA {r['compact']:,} B, PEFT LoRA {r['peft']:,} B, "
                  f"reload exact {r['exact']}, "
                  f"adapt {r['adapt_s']:.1f} s, save {r['save_s']:.2f} s, load {r['load_s']:.1f} s", flush=True)
    timing = "; ".join(f"{r['name']} {r['dtype']}: adapt {r['adapt_s']:.1f} s, save {r['save_s']:.2f} s, "
                       f"load {r['load_s']:.1f} s" for r in rows)
    text = "\n".join([
        "# Adapter file sizes: GiVA vs PEFT LoRA of the same rank",
        "",
        f"`OMP_NUM_THREADS=1 python bench/adapter_size.py --rank {args.rank}"
        f"{' --no-bert-base' if args.no_bert_base else ''}`",
        f"(torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} thread(s); random weights, default targets, "
        f"rank {args.rank}, "
        "one tiny profiling batch).",
        "",
        table(rows),
        "",
        "Sizes in bytes. \"GiVA file\" is `giva_fx.save_adapter` with the default init Vr: A (r x in) and the "
        "vectors lambda_s (r) and lambda_o (out) are stored; B (out x r) is regenerated from the seed at load, "
        "bit for bit (checked: reload exact = " + ", ".join(str(r["exact"]) for r in rows) + "). "
        "\"B stored\" is `compact=False`. \"init=random\" regenerates A too, so only the vectors and the metadata "
        "remain (a VeRA-like baseline, not GiVA's gradient bases). The metadata is one JSON entry: config, per-op "
        "kind/layout/rank/init and the SHA-256 fingerprint of every adapted base weight; \"header\" is that entry "
        "plus safetensors' own index of tensor names, dtypes, shapes and offsets. \"PEFT LoRA same r\" is "
        "PEFT's own `save_pretrained` with target_modules = the modules GiVA adapted; \"giva LoRA export\" is "
        "`giva_fx.export.peft_lora` of the same GiVA adapter (lossless, loadable with `PeftModel.from_pretrained`). "
        "PEFT keeps LoRA weights in float32 for a bf16 base (its default `autocast_adapter_dtype=True`); the "
        "export writes them in the model's dtype.",
        "",
        f"Times (one run each, not a benchmark): {timing}.",
        "",
    ])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(RESULTS) as tmp_path:
        tmp_path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
