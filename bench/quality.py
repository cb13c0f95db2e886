"""Quality: pretrain-then-fine-tune on offline data, GiVA next to PEFT LoRA, LoRA-GA and VeRA.

Protocol, per task: every method searches its learning rate with seed 0 (`bench.search`: from the
calibrated rate of its family below, one half-decade rung at a time, until the best is bracketed by
worse rates or stands on the family's bound, `methods.LR_BOUNDS`); the best learning rate (by the
final metric) is then run with the other seeds, and the table reports mean and sample standard
deviation over all seeds at that learning rate, after the same number of steps for every method, on
the same data order per seed. Trainable parameters are counted from the parameters the optimizer
gets (adapter vectors or matrices plus the task's head). The metric is measured on the task's fixed
evaluation set at the start and the end of each run; the curves show the training loss of every step.
All tasks' runs share one pool of workers (`runs.Pool`), longest first. The quick run tries each
family's calibrated learning rate with one seed, for a few steps.

    python -m bench --only quality [--quick]

Writes `quality.md`, `quality_curves_<task>.png` (training loss vs step at each method's best
learning rate, mean over seeds) and `quality_vs_params.png`.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import command_line, header, markdown_table, mean_sd, results_dir, write
from bench.methods import LR_BOUNDS, Method
from bench.runs import Pool, RunSpec
from bench.search import Search, rungs
from bench.tasks import task as get_task

INITS = ("Vr", "VrUr", "VrU2r", "VrUrand")

#: where each family's search starts, per task: the best learning rate most methods of the family
#: reached in the last run with fixed grids (bench/results/quality.md of 2026-12-04 23:22, 3 seeds,
#: grids 1e-2..1e-1, LoRA 1e-3..1e-2, full 1e-4..3e-3); the CNN's random bases, best on that grid's
#: edge, start there
CALIBRATED: dict[str, dict[str, float]] = {
    "char_gpt2": {"giva": 3e-2, "random": 3e-2, "vera": 3e-2, "lora": 3e-3, "loraga": 3e-3, "head": 3e-2,
                  "full": 3e-4},
    "digits_vit": {"giva": 3e-2, "random": 3e-2, "vera": 3e-2, "lora": 3e-3, "loraga": 3e-3, "head": 3e-2,
                   "full": 1e-3},
    "digits_cnn": {"giva": 3e-2, "random": 1e-1, "lora": 3e-3, "head": 3e-2, "full": 1e-3},
}


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
    quick: bool
    eval_every: int | None = None  # None: evaluate at the start and the end only

    def methods(self, task: str) -> list[Method]:
        chosen = QUICK_METHODS if self.quick else CNN_METHODS if task == "digits_cnn" else full_methods()
        return [m for m in chosen if m.supported(get_task(task))]

    def search(self, task: str, method: Method) -> Search:
        """The quick run tries the calibrated learning rate only."""
        start = CALIBRATED[task][method.family]
        return Search((start,) if self.quick else rungs(*LR_BOUNDS[method.family]), start)

    def spec(self, task: str, method: Method, lr: float, seed: int) -> RunSpec:
        steps = self.tasks[task]
        return RunSpec(task, method, lr, seed, steps, self.eval_every or steps)

    def least_runs(self) -> list[RunSpec]:
        """The runs every search makes at least: its first round, then the other seeds at its start."""
        specs = []
        for t in self.tasks:
            for m in self.methods(t):
                search = self.search(t, m)
                specs += [self.spec(t, m, lr, 0) for lr in search.first()]
                specs += [self.spec(t, m, search.start, seed) for seed in range(1, self.seeds)]
        return specs


FULL = Plan({"char_gpt2": 200, "digits_vit": 200, "digits_cnn": 150}, seeds=3, quick=False)
QUICK = Plan({"char_gpt2": 20, "digits_vit": 20}, seeds=1, quick=True)


@dataclass
class Result:
    """One method on one task: its search (seed 0, by learning rate) and its seeds at the best one."""

    task: str
    method: Method
    search: Search
    sweep: dict[float, dict] = field(default_factory=dict)
    seeds: list[dict] = field(default_factory=list)

    @property
    def best_lr(self) -> float:
        return self.search.best()

    @property
    def edge(self) -> bool:
        return self.search.at_bound()

    @property
    def finals(self) -> list[float]:
        return [r["final"] for r in self.seeds]

    @property
    def trainable(self) -> int:
        return self.seeds[0]["trainable"]

    @property
    def mean_sd(self) -> tuple[float, float]:
        return mean_sd(self.finals)


def score(record: dict) -> float:
    """Lower is better; a diverged run loses to every finished one."""
    if record["diverged"] or not math.isfinite(record["final"]):
        return math.inf
    return record["final"] if not get_task(record["task"]).higher_is_better else -record["final"]


def _tune_then_seed(plan: Plan, pool: Pool, result: Result) -> None:
    """Submit the search's runs round by round, then the other seeds at its best learning rate."""
    task, method, search = result.task, result.method, result.search

    def submit_round(lrs: list[float]) -> None:
        pending = set(lrs)

        def on_record(record: dict) -> None:
            result.sweep[record["lr"]] = record
            search.add(record["lr"], [score(record)])
            pending.discard(record["lr"])
            if pending:
                return
            if more := search.next():
                submit_round(more)
                return
            result.seeds.append(result.sweep[search.best()])
            for seed in range(1, plan.seeds):
                pool.submit(plan.spec(task, method, search.best(), seed), result.seeds.append)

        for lr in lrs:
            pool.submit(plan.spec(task, method, lr, 0), on_record)

    submit_round(search.first())


def run_plan(plan: Plan, pool: Pool) -> list[Result]:
    results = [Result(t, m, plan.search(t, m)) for t in plan.tasks for m in plan.methods(t)]
    for result in results:
        _tune_then_seed(plan, pool, result)
    pool.run()
    for r in results:
        r.seeds.sort(key=lambda record: record["seed"])
    return results


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
        sweep = ", ".join(f"{lr:g}: {'div' if r.sweep[lr]['diverged'] else _fmt(r.sweep[lr]['final'], task)}"
                          for lr in sorted(r.sweep))
        rows.append([r.method.name, f"{r.trainable:,}", f"{r.best_lr:g}{' (edge)' if r.edge else ''}",
                     f"{_fmt(m, task)} ± {_fmt_diff(s, task)}", len(r.finals), sweep])
    return markdown_table(["method", "trainable", "best lr", f"{t.metric} (mean ± sd)", "seeds",
                           "learning rates tried, seed 0"], rows)


SMOOTH = 10  # steps in the moving average of the plotted training loss


def _curves(result: Result) -> tuple[list[int], list[float]]:
    """The training loss at each step, mean over the seeds that ran to the end, moving average."""
    steps = result.seeds[0]["steps"]
    runs = [r["train_loss"] for r in result.seeds if len(r["train_loss"]) == steps] or [result.seeds[0]["train_loss"]]
    mean = [sum(col) / len(col) for col in zip(*runs)]
    window = max(1, min(SMOOTH, len(mean) // 4))
    smooth = [sum(mean[i - window:i]) / window for i in range(window, len(mean) + 1)]
    return list(range(window, len(mean) + 1)), smooth


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
        ax.set_ylabel(f"training loss (mean over seeds, moving average of {SMOOTH} steps)")
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
           pool: Pool) -> str:
    runs = f"{pool.computed} training runs" + (f", {pool.reused} stored ones reused (--reuse)" if pool.reused else "")
    search = ("the calibrated learning rate of its family only (quick run)" if plan.quick else
              "the best learning rate of its search (seed 0: from its family's calibrated rate, one "
              "half-decade rung outward at a time until the best is bracketed by worse rates; `(edge)` marks a "
              "best on the family's bound, beyond which nothing was tried)")
    parts = [header("Quality: GiVA vs PEFT LoRA, LoRA-GA and VeRA after equal steps", command_line(), load, 1), (
        f"Each method at {search}, then {plan.seeds} seed(s) there; every method sees the same data "
        "order per seed and adapts the same ops (all attention and MLP linears of every block; for the CNN "
        "every conv and the hidden head linear), and trains the task's head where it has one. AdamW (fused), no "
        "weight decay, warm-up over 5% of steps then constant, gradient norm clipped to 1; gradient inits "
        "(giva, LoRA-GA) profile the same 4 batches. The metric is taken on the task's fixed evaluation set "
        f"after the last step. Wall time {wall_s / 60:.1f} min, {runs}.\n")]
    for task, steps in plan.tasks.items():
        t = get_task(task)
        before = next(r.seeds[0]["curve"][0][1] for r in results if r.task == task)
        parts += [f"## {t.title} ({steps} steps, {t.metric}, {'higher' if t.higher_is_better else 'lower'} is better)",
                  "", f"Pretrained base before fine-tuning: {_fmt(before, task)}.", "",
                  table(results, task), "", *(f"- {v}" for v in verdicts(results, task)), "",
                  f"![curves](quality_curves_{task}.png)", ""]
    parts += ["![quality vs trainable parameters](quality_vs_params.png)", ""]
    return "\n".join(parts)


def main(quick: bool, jobs: int, reuse: bool) -> Path:
    plan = QUICK if quick else FULL
    load, start = os.getloadavg(), time.perf_counter()
    for name in plan.tasks:
        get_task(name).ensure_base()
    pool = Pool(jobs, reuse=reuse)
    results = run_plan(plan, pool)
    out = results_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out)
    path = out / "quality.md"
    write(path, report(results, plan, load, time.perf_counter() - start, pool))
    return path
