"""ONNX Runtime training (`OrtTrainer`) vs the PyTorch adapted model: time per step, peak memory, sizes.

    OMP_NUM_THREADS=1 python -m bench.ort_training [--quick] [--steps 10]

For each model the same adapted model (same bases, same initial vectors) trains on the same batch
with AdamW, once through `giva_fx.export.OrtTrainer` on the artifacts of `training_artifacts`, once
as the PyTorch `GivaModel` (rebuilt with `load_adapter`, so no profiling runs in that process), both
in eval form (no dropout, frozen batch norm) on one CPU thread. Each (model, framework) runs in a
fresh process, which reports:

* ms/step: the median over the timed steps (after warm-up steps) of one forward + backward +
  optimizer step;
* memory: the process's RSS once the trainer is ready (libraries and weights loaded), and its peak
  RSS from then on through warm-up and timed steps (Linux's VmHWM, reset through /proc/self/clear_refs
  when setup ends), so the peak is that of training, not of loading or exporting.

Sizes: the float32 base model (parameters + buffers) against each training artifact and the merged
inference ONNX model. `--quick` runs small configurations and writes to bench/results/quick/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import header, markdown_table, quiet, results_dir, status_kb, write

MB = 1024 * 1024
FRAMEWORKS = ("pytorch", "ort")


def sample_of(name: str, quick: bool) -> Any:
    """The batch every run trains on, seeded (the ORT process needs only this, not the model)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    batch = 4 if quick else 8
    if name == "bert-small":
        ids = torch.randint(1000, 20000, (batch, 32 if quick else 128), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.randint(0, 2, (batch,), generator=gen)}
    size = 64 if quick else {"vit-tiny": 224, "resnet18": 128}[name]
    return torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def model_of(name: str, quick: bool) -> Any:
    """The base model in eval mode, seeded: every process builds the same."""
    import torch

    torch.manual_seed(0)
    if name == "bert-small":
        import transformers

        hidden, layers = (64, 2) if quick else (256, 4)
        config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                         intermediate_size=4 * hidden, num_labels=2)
        return transformers.BertForSequenceClassification(config).eval()
    import timm

    arch = {"vit-tiny": "vit_tiny_patch16_224", "resnet18": "resnet18"}[name]
    extra = {"img_size": 64 if quick else 224} if name.startswith("vit") else {}
    return timm.create_model(arch, pretrained=False, num_classes=10, **extra).eval()


LOSS = {"bert-small": "model", "vit-tiny": "cross_entropy", "resnet18": "cross_entropy"}
MODELS = ("bert-small", "vit-tiny", "resnet18")
LR, EPS, WEIGHT_DECAY, RANK = 1e-3, 1e-8, 0.01, 8


def child(name: str, framework: str, work: Path, steps: int, warmup: int, quick: bool) -> dict[str, float]:
    """Train in this (fresh) process and measure; see the module docstring."""
    import torch

    import giva_fx
    from giva_fx.batches import as_batch
    from giva_fx.export import OrtTrainer
    from giva_fx.loss import batch_loss

    torch.set_num_threads(1)
    sample = sample_of(name, quick)
    if framework == "ort":
        trainer = OrtTrainer(work / "artifacts", lr=LR, threads=1)

        def step() -> float:
            return trainer.step(sample)
    else:
        adapted = giva_fx.load_adapter(model_of(name, quick), work / "adapter.safetensors", sample).eval()
        params = list(giva_fx.trainable_parameters(adapted).values())
        opt = torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)
        batch = as_batch(sample)

        def step() -> float:
            loss = batch_loss(adapted(*batch.args, **batch.kwargs), batch, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

    ready_kb = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"ms_per_step": 1000 * statistics.median(times), "ms_min": 1000 * min(times),
            "ready_mb": ready_kb / 1024, "peak_mb": status_kb("VmHWM") / 1024,
            "first_loss": losses[0], "last_loss": losses[-1]}


def prepare(name: str, work: Path, quick: bool) -> dict[str, float]:
    """Adapt once; write the adapter file (for the PyTorch run), the artifacts and a merged ONNX model."""
    import giva_fx
    import giva_fx.export as gx

    model, sample = model_of(name, quick), sample_of(name, quick)
    adapted = giva_fx.adapt(model, sample, rank=RANK, progress=False)
    giva_fx.save_adapter(adapted, work / "adapter.safetensors")
    start = time.perf_counter()
    gx.training_artifacts(adapted.eval(), sample, work / "artifacts", loss=LOSS[name], eps=EPS,
                          weight_decay=WEIGHT_DECAY)
    export_s = time.perf_counter() - start
    gx.onnx(adapted, sample, work / "merged.onnx")
    files = {f: (work / "artifacts" / f).stat().st_size / MB
             for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")}
    base = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / MB
    trainable = sum(p.numel() for p in giva_fx.trainable_parameters(adapted).values())
    return {"base_mb": base, **files, "merged_onnx_mb": (work / "merged.onnx").stat().st_size / MB,
            "export_s": export_s, "trainable": trainable, "params": sum(p.numel() for p in model.parameters()),
            "adapters": len(adapted.adapters())}


def run_child(name: str, framework: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, "-m", "bench.ort_training", "--child", name, framework, str(work),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{name}/{framework} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ort_training", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small configurations, results/quick/")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "FRAMEWORK", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet()
    if args.child:
        name, framework, work = args.child
        print(json.dumps(child(name, framework, Path(work), args.steps, args.warmup, args.quick)))
        return
    load = os.getloadavg()
    command = "OMP_NUM_THREADS=1 python -m bench.ort_training" + (" --quick" if args.quick else "") + (
        f" --steps {args.steps}" if args.steps != 10 else "")
    speed_rows, size_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            work = Path(tmp) / name
            work.mkdir()
            sizes = prepare(name, work, args.quick)
            runs = {fw: run_child(name, fw, work, args) for fw in FRAMEWORKS}
            print(name, json.dumps({"sizes": sizes, **runs}), flush=True)
            pt, ort = runs["pytorch"], runs["ort"]
            speed_rows.append([name, f"{sizes['params'] / 1e6:.1f}M", f"{sizes['trainable']:,}",
                               f"{pt['ms_per_step']:.0f}", f"{ort['ms_per_step']:.0f}",
                               f"{pt['ms_per_step'] / ort['ms_per_step']:.2f}",
                               f"{pt['ready_mb']:.0f} / {pt['peak_mb']:.0f} (+{pt['peak_mb'] - pt['ready_mb']:.0f})",
                               f"{ort['ready_mb']:.0f} / {ort['peak_mb']:.0f} "
                               f"(+{ort['peak_mb'] - ort['ready_mb']:.0f})",
                               f"{pt['first_loss']:.4f} -> {pt['last_loss']:.4f}",
                               f"{ort['first_loss']:.4f} -> {ort['last_loss']:.4f}"])
            artifacts = sum(sizes[f] for f in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx",
                                               "checkpoint"))
            size_rows.append([name, f"{sizes['base_mb']:.1f}", f"{sizes['checkpoint']:.1f}",
                              f"{sizes['training_model.onnx']:.2f}", f"{sizes['eval_model.onnx']:.2f}",
                              f"{sizes['optimizer_model.onnx'] * 1024:.1f} kB", f"{artifacts:.1f}",
                              f"{artifacts / sizes['base_mb']:.2f}", f"{sizes['merged_onnx_mb']:.1f}",
                              f"{sizes['export_s']:.1f}"])
    end_load = os.getloadavg()
    configs = "quick: small configurations (see sample_of, model_of)" if args.quick else (
        "bert-small: BERT 4 x 256 (vocab 30522), batch 8 x 128 tokens, its own loss; vit-tiny: timm "
        "vit_tiny_patch16_224, batch 8 x 224 px; resnet18: timm resnet18, batch 8 x 128 px; both cross-entropy, "
        "10 classes")
    text = "\n".join([
        header("OrtTrainer vs PyTorch: one training step of the adapter vectors", command, load, 1),
        f"- load average at end: {', '.join(f'{x:.2f}' for x in end_load)} (2 cores shared with other jobs: "
        "absolute times are noisy; both frameworks of a model ran back to back)",
        f"- models: {configs}; rank {RANK}, init Vr, every linear and conv adapted except heads; AdamW lr {LR}, "
        f"eps {EPS}, weight decay {WEIGHT_DECAY}; eval form (no dropout, frozen batch norm); one thread each "
        f"(torch.set_num_threads(1), ORT intra-op threads 1); {args.warmup} warm-up + {args.steps} timed steps "
        "on one fixed batch, each (model, framework) in a fresh process",
        "- memory: RSS once ready / peak RSS during the steps (VmHWM reset when setup ends), MB. Ready: "
        "libraries, weights, artifacts loaded; both processes import torch (onnxruntime.training needs it), "
        "only the PyTorch one imports transformers/timm and builds the model",
        "",
        "## Time and memory per training step",
        "",
        markdown_table(["model", "params", "trainable", "PyTorch ms/step", "ORT ms/step", "ORT speed-up",
                        "PyTorch RSS ready / peak MB", "ORT RSS ready / peak MB", "PyTorch loss",
                        "ORT loss"], speed_rows),
        "",
        "## Artifact sizes (MB) vs the float32 base model",
        "",
        "The checkpoint holds every initializer (frozen weights, bases, vectors); the training and eval "
        "models hold the graphs only, so the artifacts cost about one copy of the model.",
        "",
        markdown_table(["model", "base model", "checkpoint", "training_model.onnx", "eval_model.onnx",
                        "optimizer_model.onnx", "artifacts total", "total / base", "merged inference .onnx",
                        "training_artifacts() s"], size_rows),
        "",
    ])
    path = results_dir(args.quick) / "ort_training.md"
    write(path, text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
