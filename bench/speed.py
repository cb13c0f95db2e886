"""Speed and memory: a GiVA training step against the frozen-base floor, PEFT LoRA and VeRA; the
cost of adapt() against keeping every weight gradient and against PEFT's LoRA-GA init; merged
inference against the original model.

Step time. Every configuration of a model is built in one process and timed interleaved (the
order rotates every repeat), so load drifts hit all alike; each repeat's time is divided by the
floor's time in the same repeat, and the table gives min / median / max of those ratios. A step is
forward + backward + AdamW (`fused=True`, as the README recommends, for every configuration). The
floor is the frozen base with its head and one tiny parameter at the bottom (e.g. the embedding
LayerNorm) trainable: the backward runs through every block but computes no weight gradient, the
cost that no adapter in every block can beat.

Peak memory. Each configuration runs in a fresh subprocess (two at a time: each has its own
counter). After building, the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`, 5) so
that building (e.g. adapt()'s own profiling) cannot mask the step's peak; the peak extra memory is
then the peak RSS over two steps minus the RSS before them (optimizer state, gradients and
activations), read from VmHWM: the counter ru_maxrss reports, without the peak a subprocess
inherits from its parent across fork and exec. glibc is told to serve every allocation above
128 KiB with mmap (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave the RSS and the counter follows
torch's live memory; tracemalloc would not see torch's allocations at all. adapt() and its
alternatives are timed as well, so they run one at a time; the GiVA step's memory is measured in
the process that timed adapt(), on the model it built.

    python -m bench --only speed [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import giva_fx
from bench.common import (MMAP_ENV, ROOT, command_line, header, markdown_table, peak_kb, quiet, reset_peak,
                          results_dir, status_kb, write)

#: torch threads for every timing. One by default: on a shared machine a second OpenMP thread turns
#: every small op into a wait for a busy core (we saw 10x swings), and ratios need stable steps.
THREADS = int(os.environ.get("BENCH_SPEED_THREADS", "1"))
RANK = 8

# ------------------------------------------------------------------------------------- models --

BERT_LINEARS = r"bert\.encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)"


@dataclass(frozen=True)
class SpeedModel:
    name: str
    title: str
    build: Callable[[], nn.Module]  # a fresh, seeded base in eval mode
    batch: Callable[[], Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    giva_targets: tuple[str, ...]
    peft_targets: str | tuple[str, ...]
    fan_in_fan_out: bool
    head: tuple[str, ...]  # module names trained in full by every method (PEFT modules_to_save)
    bottom: tuple[str, ...]  # the floor's tiny trainable parameter(s) at the bottom
    repeats: int
    inner: int  # steps per timed block


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig()).eval()


BERT_BATCH, BERT_SEQ = 4, 128


def _bert_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 30522, (BERT_BATCH, BERT_SEQ), generator=g),
            "attention_mask": torch.ones(BERT_BATCH, BERT_SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (BERT_BATCH,), generator=g)}


def _hf_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(**batch).loss


def _task_model(task_name: str, bottom: tuple[str, ...], head: tuple[str, ...], repeats: int,
                inner: int) -> SpeedModel:
    from bench.tasks import task as get_task

    t = get_task(task_name)
    return SpeedModel(task_name, t.title, t.base, lambda: t.profile_batches(0, 1)[0], t.loss, t.giva_targets,
                      t.peft_targets, t.fan_in_fan_out, head, bottom, repeats, inner)


def speed_models(quick: bool) -> list[SpeedModel]:
    vit = _task_model("digits_vit", ("pos_embed",), ("head",), repeats=4 if quick else 15, inner=5)
    if quick:
        return [vit]
    return [
        SpeedModel("bert_base", f"BERT-base-sized encoder (12 x 768, random weights), batch {BERT_BATCH} x {BERT_SEQ}",
                   _bert,
                   _bert_batch, _hf_loss, ("bert.encoder.layer.*.weight",), BERT_LINEARS, False, ("classifier",),
                   ("bert.embeddings.LayerNorm.*",), repeats=4, inner=1),
        _task_model("char_gpt2", ("transformer.h.0.ln_1.*",), ("transformer.ln_f",), repeats=15, inner=5),
        vit,
    ]


def _model(name: str) -> SpeedModel:
    return next(m for m in speed_models(False) + speed_models(True) if m.name == name)


# ------------------------------------------------------------------------------ configurations --

GIVA = f"giva r={RANK}"
CONFIGS = ("floor", "head only", GIVA, f"PEFT LoRA r={RANK}", "PEFT VeRA r=64", "PEFT VeRA r=256", "full fine-tuning")
ADAPT_JOBS = ("adapt", "keep-all-gradients", "PEFT LoRA-GA init")
QUICK_CONFIGS = ("floor", GIVA, f"PEFT LoRA r={RANK}", "PEFT VeRA r=64")


def _globs(names: tuple[str, ...]) -> list[str]:
    return [n if n.endswith("*") else f"{n}.*" for n in names]


def _freeze_but(model: nn.Module, patterns: list[str]) -> nn.Module:
    import fnmatch

    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
    return model


def build_config(m: SpeedModel, config: str) -> nn.Module:
    """`config` on a fresh base of `m`; its trainable parameters are those requiring grad."""
    base = m.build()
    head = _globs(m.head)
    if config == "floor":
        return _freeze_but(base, head + list(m.bottom))
    if config == "head only":
        return _freeze_but(base, head)
    if config == "full fine-tuning":
        return _freeze_but(base, ["*"])
    if config == GIVA:
        return _adapt(m, base, m.batch())
    from peft import LoraConfig, VeraConfig, get_peft_model

    common = dict(target_modules=m.peft_targets if isinstance(m.peft_targets, str) else list(m.peft_targets),
                  fan_in_fan_out=m.fan_in_fan_out, modules_to_save=list(m.head) or None)
    rank = int(config.rsplit("=", 1)[1])
    peft_config = LoraConfig(r=rank, **common) if "LoRA" in config else VeraConfig(r=rank, **common)
    return get_peft_model(base, peft_config)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Stepper:
    """One training step (forward, backward, AdamW) of a built configuration."""

    def __init__(self, m: SpeedModel, model: nn.Module) -> None:
        self.m, self.model, self.batch = m, model.train(), m.batch()
        self.opt = torch.optim.AdamW(trainable(model), lr=1e-5, fused=True)

    def __call__(self) -> None:
        loss = self.m.loss(self.model, self.batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


# ----------------------------------------------------------------------------------- step time --

def interleaved(fns: dict[str, Callable[[], None]], repeats: int, inner: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, one timed block of `inner` calls per repeat, order rotating."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def ratios(times: dict[str, list[float]], reference: str) -> dict[str, tuple[float, float, float]]:
    out = {}
    for name, ts in times.items():
        rs = sorted(t / r for t, r in zip(ts, times[reference]))
        out[name] = (rs[0], statistics.median(rs), rs[-1])
    return out


def step_times(m: SpeedModel, configs: tuple[str, ...]) -> dict[str, Any]:
    built = {c: build_config(m, c) for c in configs}
    counts = {c: sum(p.numel() for p in trainable(model)) for c, model in built.items()}
    steppers = {c: Stepper(m, model) for c, model in built.items()}
    times = interleaved(steppers, m.repeats, m.inner)
    return {"times": times, "ratios": ratios(times, "floor"), "trainable": counts}


# ------------------------------------------------------------------------- measuring processes --

def _adapt(m: SpeedModel, base: nn.Module, batch: Any) -> nn.Module:
    return giva_fx.adapt(base, batch, rank=RANK, targets=list(m.giva_targets), train=_globs(m.head), progress=False)


def _step_extra_mb(m: SpeedModel, model: nn.Module) -> float:
    """Peak RSS over two training steps of the built `model` minus the RSS before them."""
    stepper = Stepper(m, model)
    rss = status_kb("VmRSS")
    reset_peak()
    for _ in range(2):
        stepper()
    return (peak_kb() - rss) / 1024


def measure(job: str, model_name: str, config: str) -> dict[str, Any]:
    """In a fresh process: the peak extra memory (and time) of one job on one model (`config`: the
    "step" job's configuration). The "adapt" job also measures the GiVA step's memory, on the model
    it built (as "step" would)."""
    m = _model(model_name)
    if job == "step":
        return {"extra_mb": _step_extra_mb(m, build_config(m, config))}
    base, batch = m.build(), m.batch()
    model_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    rss = status_kb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    split: dict[str, float]
    step: dict[str, float] = {}
    if job == "adapt":
        adapted = _adapt(m, base, batch)
        r = adapted.report
        split = {"capture": r.capture_s, "profile": r.profile_s, "SVD": r.bases_s, "rewrite": r.rewrite_s}
    elif job == "keep-all-gradients":
        split = _keep_all_gradients(m, base, batch, start)
    elif job == "PEFT LoRA-GA init":
        split = _loraga_init(m, base, batch, start)
    else:
        raise ValueError(job)
    done = {"extra_mb": (peak_kb() - rss) / 1024, "model_mb": model_mb, "total_s": time.perf_counter() - start,
            "split": split}
    if job == "adapt":
        done["step_extra_mb"] = _step_extra_mb(m, adapted)
    return done


def _keep_all_gradients(m: SpeedModel, base: nn.Module, batch: Any, start: float) -> dict[str, float]:
    """The official implementation's way: every weight requires grad, one backward, SVD afterwards."""
    import fnmatch

    from giva_fx.passes.bases import compute_bases

    for p in base.parameters():
        p.requires_grad_(True)
    m.loss(base, batch).backward()
    backward_done = time.perf_counter()
    for name, p in base.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in m.giva_targets) and p.dim() == 2:
            grad = p.grad.T if m.fan_in_fan_out else p.grad
            compute_bases(grad, out_features=grad.shape[0], in_features=grad.shape[1], rank=RANK, init="Vr",
                          seed=0, name=name)
    return {"forward+backward": backward_done - start, "SVD": time.perf_counter() - backward_done}


def _loraga_init(m: SpeedModel, base: nn.Module, batch: Any, start: float) -> dict[str, float]:
    from peft import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga

    config = LoraConfig(r=RANK, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(),
                        target_modules=m.peft_targets if isinstance(m.peft_targets, str) else list(m.peft_targets),
                        fan_in_fan_out=m.fan_in_fan_out, modules_to_save=list(m.head) or None)
    preprocess_loraga(base, config, lambda: m.loss(base, batch).backward())
    profiled = time.perf_counter()
    get_peft_model(base, config)
    return {"gradients": profiled - start, "SVD + init": time.perf_counter() - profiled}


#: glibc serves every allocation above 128 KiB with mmap, so that freed tensors leave the RSS and the
#: peak counter follows torch's live memory


def in_subprocess(job: str, model_name: str, config: str = "") -> dict[str, Any]:
    """`measure(job, model_name, config)` in a fresh interpreter. (A process forked from one that had
    imported the libraries would save their import, ~4 s, but counts ~8 MB more peak memory for the
    same digits-ViT step: library pages it first touches during the steps.)"""
    env = {**os.environ, **MMAP_ENV, "OMP_NUM_THREADS": str(THREADS)}
    out = subprocess.run([sys.executable, "-m", "bench.speed", "--measure", job, model_name, config],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{job} {model_name} {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_subprocesses(jobs: list[tuple[str, str, str]], at_once: int) -> list[dict[str, Any]]:
    """`in_subprocess(*job)` for each job, `at_once` at a time."""
    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(lambda job: in_subprocess(*job), jobs))


# ------------------------------------------------------------------------------ merged inference --

def inference(m: SpeedModel) -> dict[str, Any]:
    """Forward time of the original model vs the GiVA-adapted model, unmerged and merged."""
    original, model, batch = m.build(), m.build(), m.batch()
    adapted = giva_fx.adapt(model, batch, rank=RANK, targets=list(m.giva_targets), progress=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a in adapted.adapters().values():  # trained-looking vectors, so merging changes the weights
            a.lambda_o.copy_(torch.randn(a.lambda_o.shape, generator=gen) * 0.02)
            a.lambda_s.copy_(1 + torch.randn(a.lambda_s.shape, generator=gen) * 0.1)
    adapted.eval()

    def forward(fn: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                m.loss(fn, batch)
        return call

    with torch.no_grad():
        unmerged_loss = m.loss(adapted, batch).item()
    unmerged = ratios(interleaved({"original": forward(original), "adapted": forward(adapted)},
                                  m.repeats, m.inner), "original")["adapted"]
    giva_fx.merge(adapted, model)
    with torch.no_grad():
        merged_loss = m.loss(model, batch).item()
    merged_times = interleaved({"original": forward(original), "merged": forward(model)}, m.repeats, m.inner)
    return {"unmerged": unmerged, "merged": ratios(merged_times, "original")["merged"],
            "original_ms": 1000 * statistics.median(merged_times["original"]),
            "loss_gap": abs(merged_loss - unmerged_loss)}


# -------------------------------------------------------------------------------------- report --

def _ratio(r: tuple[float, float, float]) -> str:
    return f"{r[1]:.3f} ({r[0]:.3f}-{r[2]:.3f})"


def model_section(m: SpeedModel, steps: dict[str, Any], memory: dict[str, dict], adapt_jobs: dict[str, dict],
                  infer: dict[str, Any]) -> str:
    floor_mb = memory["floor"]["extra_mb"]
    rows = [[c, f"{steps['trainable'][c]:,}", f"{1000 * statistics.median(steps['times'][c]):.1f}",
             _ratio(steps["ratios"][c]), f"{memory[c]['extra_mb']:.0f}",
             f"{memory[c]['extra_mb'] / floor_mb:.2f}" if floor_mb > 0 else "-"] for c in steps["times"]]
    lora = f"PEFT LoRA r={RANK}"
    giva_step = statistics.median(steps["times"][GIVA])
    adapt, keep = adapt_jobs["adapt"], adapt_jobs["keep-all-gradients"]
    adapt_rows = [[job, f"{r['total_s']:.2f}", ", ".join(f"{k} {v:.2f}" for k, v in r["split"].items()),
                   f"{r['extra_mb']:.0f}", f"{r['extra_mb'] / keep['extra_mb']:.2f}"] for job, r in adapt_jobs.items()]
    lines = [
        f"## {m.title}", "",
        f"Step = forward + backward + AdamW (fused); {m.repeats} interleaved repeats of {m.inner} step(s). "
        "Ratio to the floor: median (min-max) over repeats. Peak extra memory: fresh process, peak RSS over "
        "two steps minus RSS after building.", "",
        markdown_table(["configuration", "trainable", "step ms (median)", "x floor step", "peak extra MB",
                        "x floor memory"], rows), "",
        markdown_table(["adapt() one batch vs alternatives", "wall s", "split (s)", "peak extra MB",
                        "x keep-all-gradients memory"], adapt_rows), "",
        f"Base model parameters: {adapt['model_mb']:.0f} MB. adapt() took {adapt['total_s'] / giva_step:.1f} "
        f"GiVA training steps of time; its peak extra memory is {adapt['extra_mb'] / adapt['model_mb']:.2f}x "
        "the model's size.", "",
        f"Inference (eval, no grad; {m.repeats} interleaved repeats): original {infer['original_ms']:.1f} ms; "
        f"unmerged adapted model {_ratio(infer['unmerged'])} x original; merged model "
        f"{_ratio(infer['merged'])} x original (loss merged vs unmerged differs by {infer['loss_gap']:.1e}).", "",
    ]
    targets = [
        ("giva step <= 1.10 x floor step", steps["ratios"][GIVA][1] <= 1.10, f"{steps['ratios'][GIVA][1]:.3f}"),
        ("giva step <= PEFT LoRA step, same rank", giva_step <= statistics.median(steps["times"][lora]),
         f"{giva_step / statistics.median(steps['times'][lora]):.3f} x LoRA"),
        ("adapt() <= 5 training steps", adapt["total_s"] <= 5 * giva_step, f"{adapt['total_s'] / giva_step:.1f} steps"),
        ("adapt() peak extra memory <= 0.5 x keep-all-gradients", adapt["extra_mb"] <= 0.5 * keep["extra_mb"],
         f"{adapt['extra_mb'] / keep['extra_mb']:.2f}"),
        ("merged inference within 2% of original", infer["merged"][1] <= 1.02, f"{infer['merged'][1]:.3f}"),
    ]
    lines += [markdown_table(["target", "met", "measured"], [[t, "yes" if ok else "**no**", v] for t, ok, v in targets]),
              ""]
    return "\n".join(lines)


def main(quick: bool) -> Path:
    load, start = os.getloadavg(), time.perf_counter()
    torch.set_num_threads(THREADS)
    sections = []
    for m in speed_models(quick):
        if m.name != "bert_base":
            from bench.tasks import task as get_task

            get_task(m.name).ensure_base()
        configs = QUICK_CONFIGS if quick else CONFIGS
        phases = [time.perf_counter()]
        # memory only: two processes at a time (each its own peak counter); adapt() is timed, so alone
        others = [c for c in configs if c != GIVA]
        memory = dict(zip(others, in_subprocesses([("step", m.name, c) for c in others], at_once=2)))
        phases.append(time.perf_counter())
        adapt_jobs = dict(zip(ADAPT_JOBS, in_subprocesses([(job, m.name, "") for job in ADAPT_JOBS], at_once=1)))
        memory[GIVA] = {"extra_mb": adapt_jobs["adapt"]["step_extra_mb"]}
        phases.append(time.perf_counter())
        steps = step_times(m, configs)
        phases.append(time.perf_counter())
        infer = inference(m)
        phases.append(time.perf_counter())
        sections.append(model_section(m, steps, memory, adapt_jobs, infer))
        print(f"speed: {m.name} in {phases[-1] - phases[0]:.0f} s (" + ", ".join(
            f"{name} {b - a:.0f} s" for name, a, b in zip(("memory", "adapt()", "step times", "inference"),
                                                          phases, phases[1:])) + ")", flush=True)
    text = "\n".join([
        header("Speed and memory: GiVA vs the frozen-base floor, PEFT LoRA and VeRA", command_line(), load, THREADS),
        f"All timings on CPU with {THREADS} torch threads. The floor: frozen base with its head and one tiny "
        "parameter at the bottom trainable (backward through every block, no weight gradients). Total wall time "
        f"{(time.perf_counter() - start) / 60:.1f} min.", "", *sections])
    out = results_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed.md"
    write(path, text)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", nargs=3, metavar=("JOB", "MODEL", "CONFIG"), required=True)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(THREADS)
    print(json.dumps(measure(*args.measure)))
