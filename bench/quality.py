"""Quality: pretrain-then-fine-tune on offline data, GiVA next to PEFT LoRA, LoRA-GA and VeRA.

Protocol, per task: every method runs its learning-rate grid (`methods.LR_GRID`) with seed 0; the
best learning rate (by the final metric) is then run with the other seeds, and the table reports
mean and sample standard deviation over all seeds at that learning rate, after the same number of
steps for every method, on the same data order per seed. Trainable parameters are counted from
the parameters the optimizer gets (adapter vectors or matrices plus the task's head).

    python -m bench --only quality [--quick]

Writes `quality.md`, `quality_curves_<task>.png` (metric vs step at each method's best learning
rate, mean over seeds) and `quality_vs_params.png`.
"""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import command_line, header, markdown_table, mean_sd, results_dir, write
from bench.methods import LR_GRID, Method
from bench.runs import RunSpec, run_all
from bench.tasks import task as get_task

INITS = ("Vr", "VrUr", "VrU2r", "VrUrand")


def full_methods() -> list[Method]:
    return [
        *(Method("giva", r, init) for r in (4, 8) for init in INITS),
        *(Method("random", r) for r in (8, 32, 64)),
        *(Method("vera", r) for r in (8, 64, 256)),
        *(Method("lora", r) for r in (4, 8)),
        *(Method("loraga", r) for r in (4, 8)),
        Method("head"), Method("full"),
    ]


CNN_METHODS = [*(Method("giva", 8, init) for init in INITS), Method("random", 8), Method("random", 64),
               Method("lora", 8), Method("head"), Method("full")]
QUICK_METHODS = [Method("giva", 8, "Vr"), Method("random", 8), Method("vera", 64), Method("lora", 8),
                 Method("loraga", 8), Method("head"), Method("full")]


@dataclass(frozen=True)
class Plan:
    tasks: dict[str, int]  # task -> steps
    seeds: int
    eval_every: int
    quick: bool

    def methods(self, task: str) -> list[Method]:
        chosen = QUICK_METHODS if self.quick else CNN_METHODS if task == "digits_cnn" else full_methods()
        return [m for m in chosen if m.supported(get_task(task))]

    def grid(self, method: Method) -> tuple[float, ...]:
        grid = LR_GRID[method.family]
        return grid[1:2] if self.quick else grid


FULL = Plan({"char_gpt2": 200, "digits_vit": 200, "digits_cnn": 150}, seeds=3, eval_every=25, quick=False)
QUICK = Plan({"char_gpt2": 20, "digits_vit": 20}, seeds=1, eval_every=10, quick=True)


@dataclass
class Result:
    """One method on one task: its sweep (seed 0) and its seeds at the best learning rate."""

    task: str
    method: Method
    sweep: dict[float, dict]
    seeds: list[dict]

    @property
    def best_lr(self) -> float:
        return self.seeds[0]["lr"]

    @property
    def finals(self) -> list[float]:
        return [r["final"] for r in self.seeds]

    @property
    def trainable(self) -> int:
        return self.seeds[0]["trainable"]

    @property
    def mean_sd(self) -> tuple[float, float]:
        return mean_sd(self.finals)


def _best_lr(records: Sequence[dict], higher_is_better: bool) -> float:
    ok = [r for r in records if not r["diverged"] and math.isfinite(r["final"])] or list(records)
    return (max if higher_is_better else min)(ok, key=lambda r: r["final"])["lr"]


def run_plan(plan: Plan, jobs: int, reuse: bool) -> list[Result]:
    """Phase 1: every grid point with seed 0. Phase 2: the other seeds at each best learning rate."""
    sweep_specs = [RunSpec(t, m, lr, 0, steps, plan.eval_every)
                   for t, steps in plan.tasks.items() for m in plan.methods(t) for lr in plan.grid(m)]
    print(f"quality: {len(sweep_specs)} sweep runs", flush=True)
    sweep = run_all(sweep_specs, jobs=jobs, reuse=reuse)
    by_method: dict[tuple[str, Method], dict[float, dict]] = defaultdict(dict)
    for r in sweep:
        by_method[(r["task"], r["method"])][r["lr"]] = r
    best = {k: _best_lr(list(v.values()), get_task(k[0]).higher_is_better) for k, v in by_method.items()}
    seed_specs = [RunSpec(t, m, best[(t, m)], s, plan.tasks[t], plan.eval_every)
                  for (t, m) in by_method for s in range(1, plan.seeds)]
    print(f"quality: {len(seed_specs)} seed runs at the best learning rates", flush=True)
    seeded = run_all(seed_specs, jobs=jobs, reuse=reuse)
    extra: dict[tuple[str, Method], list[dict]] = defaultdict(list)
    for r in seeded:
        extra[(r["task"], r["method"])].append(r)
    return [Result(t, m, runs, [runs[best[(t, m)]], *extra[(t, m)]]) for (t, m), runs in by_method.items()]


# ----------------------------------------------------------------------------------- verdicts --

def _fmt(value: float, task: str) -> str:
    return f"{100 * value:.1f}%" if get_task(task).metric == "test accuracy" else f"{value:.3f}"


def _fmt_diff(value: float, task: str) -> str:
    return f"{100 * value:.1f} points" if get_task(task).metric == "test accuracy" else f"{value:.3f}"


def compare(a: Result, b: Result) -> str:
    """'matches' when the difference of means is within two standard errors of it, else better/worse."""
    (ma, sa), (mb, sb) = a.mean_sd, b.mean_sd
    se = math.sqrt(sa**2 / len(a.finals) + sb**2 / len(b.finals))
    diff = ma - mb
    task = get_task(a.task)
    if min(len(a.finals), len(b.finals)) < 2:
        word = "one seed, no spread: " + ("ahead of" if task.better(ma, mb) else "behind")
    elif abs(diff) <= 2 * se:
        word = "matches"
    else:
        word = "beats" if task.better(ma, mb) else "falls short of"
    return (f"{a.method.name} ({_fmt(ma, a.task)}) {word} {b.method.name} ({_fmt(mb, b.task)}; "
            f"difference {_fmt_diff(abs(diff), a.task)}, 2 standard errors {_fmt_diff(2 * se, a.task)})")


def verdicts(results: Sequence[Result], task: str) -> list[str]:
    mine = {r.method: r for r in results if r.task == task}
    t = get_task(task)
    out = []

    def pick(family: str, rank: int = 0, init: str = "") -> Result | None:
        return mine.get(Method(family, rank, init))

    for rank in (4, 8):
        givas = [r for m, r in mine.items() if m.family == "giva" and m.rank == rank]
        if not givas:
            continue
        ranked = sorted(givas, key=lambda r: r.mean_sd[0], reverse=t.higher_is_better)
        best = ranked[0]
        if len(ranked) > 1:
            order = " > ".join(f"{r.method.init} {_fmt(r.mean_sd[0], task)}" for r in ranked)
            out.append(f"Init modes at r={rank} (best first): {order}; the best, {best.method.init}, "
                       f"{'is within seed spread of' if _within(best, ranked[1]) else 'is clearly ahead of'} "
                       f"the runner-up ({ranked[1].method.init}).")
        for other in (pick("vera", 8 * rank), pick("random", 8 * rank), pick("random", rank), pick("lora", rank),
                      pick("loraga", rank)):
            if other is not None:
                out.append(f"At r={rank}: " + compare(best, other) + ".")
    for name in ("head", "full"):
        if (r := pick(name)) is not None:
            m, s = r.mean_sd
            out.append(f"{r.method.name}: {_fmt(m, task)} ± {_fmt_diff(s, task)} "
                       f"({'floor' if name == 'head' else 'ceiling'}).")
    return out


def _within(a: Result, b: Result) -> bool:
    (ma, sa), (mb, sb) = a.mean_sd, b.mean_sd
    return abs(ma - mb) <= 2 * math.sqrt(sa**2 / len(a.finals) + sb**2 / len(b.finals))


# ------------------------------------------------------------------------------------- output --

def table(results: Sequence[Result], task: str) -> str:
    t = get_task(task)
    rows = []
    for r in [r for r in results if r.task == task]:
        m, s = r.mean_sd
        grid = sorted(r.sweep)
        sweep = ", ".join(f"{lr:g}: {'div' if r.sweep[lr]['diverged'] else _fmt(r.sweep[lr]['final'], task)}"
                          for lr in grid)
        edge = " (edge)" if len(grid) > 1 and r.best_lr in (grid[0], grid[-1]) else ""
        rows.append([r.method.name, f"{r.trainable:,}", f"{r.best_lr:g}{edge}",
                     f"{_fmt(m, task)} ± {_fmt_diff(s, task)}", len(r.finals), sweep])
    return markdown_table(["method", "trainable", "best lr", f"{t.metric} (mean ± sd)", "seeds",
                           "lr sweep, seed 0"], rows)


def _curves(result: Result) -> tuple[list[int], list[float]]:
    steps = [s for s, _ in result.seeds[0]["curve"]]
    values = [[v for _, v in r["curve"]] for r in result.seeds if len(r["curve"]) == len(steps)]
    return steps, [sum(col) / len(col) for col in zip(*values)]


STYLE = {"giva": ("tab:blue", "-"), "random": ("tab:cyan", "--"), "vera": ("tab:orange", "--"),
         "lora": ("tab:green", "-"), "loraga": ("tab:olive", "-."), "head": ("grey", ":"), "full": ("black", ":")}


def plot(results: Sequence[Result], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = list(dict.fromkeys(r.task for r in results))
    for task in tasks:
        t = get_task(task)
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in [r for r in results if r.task == task]:
            color, ls = STYLE[r.method.family]
            steps, values = _curves(r)
            ax.plot(steps, values, ls, color=color, alpha=0.45 + 0.55 * (r.method.rank in (0, 8)),
                    lw=1.2, label=f"{r.method.name} (lr {r.best_lr:g})")
        ax.set_xlabel("step")
        ax.set_ylabel(t.metric + " (mean over seeds)")
        ax.set_title(t.title)
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"quality_curves_{task}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        t = get_task(task)
        for family, (color, _) in STYLE.items():
            rs = [r for r in results if r.task == task and r.method.family == family]
            if rs:
                ax.errorbar([r.trainable for r in rs], [r.mean_sd[0] for r in rs], [r.mean_sd[1] for r in rs],
                            fmt="o", color=color, label=family, capsize=2, ms=4)
                for r in rs:
                    if r.method.rank:
                        ax.annotate(f"{r.method.init or ''}{r.method.rank}", (r.trainable, r.mean_sd[0]),
                                    fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(t.metric)
        ax.set_title(t.title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "quality_vs_params.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def report(results: Sequence[Result], plan: Plan, load: tuple[float, float, float], wall_s: float,
           reuse: bool) -> str:
    parts = [header("Quality: GiVA vs PEFT LoRA, LoRA-GA and VeRA after equal steps", command_line(), load, 1), (
        f"Each method at the best learning rate of its grid (seed 0 sweep shown; `(edge)` marks a best "
        f"learning rate at the grid's edge), then {plan.seeds} seeds there; every method sees the same data "
        "order per seed and adapts the same ops (all attention and MLP linears of every block; for the CNN "
        "every conv and the hidden head linear), and trains the task's head where it has one. AdamW, no "
        "weight decay, warm-up over 5% of steps then constant, gradient norm clipped to 1; gradient inits "
        f"(giva, LoRA-GA) profile the same 4 batches. Wall time {wall_s / 60:.1f} min{' (stored runs reused: see --reuse)' if reuse else ''}.\n")]
    for task, steps in plan.tasks.items():
        t = get_task(task)
        parts += [f"## {t.title} ({steps} steps, {t.metric}, {'higher' if t.higher_is_better else 'lower'} is better)",
                  "", table(results, task), "", *(f"- {v}" for v in verdicts(results, task)), "",
                  f"![curves](quality_curves_{task}.png)", ""]
    parts += ["![quality vs trainable parameters](quality_vs_params.png)", ""]
    return "\n".join(parts)


def main(quick: bool, jobs: int, reuse: bool) -> Path:
    plan = QUICK if quick else FULL
    load, start = os.getloadavg(), time.perf_counter()
    for name in plan.tasks:
        get_task(name).ensure_base()
    results = run_plan(plan, jobs, reuse)
    out = results_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out)
    path = out / "quality.md"
    write(path, report(results, plan, load, time.perf_counter() - start, reuse))
    return path
