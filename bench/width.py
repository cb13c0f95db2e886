"""Width sweep: where do gradient bases start to pay off? GiVA vs random bases vs VeRA at 8r.

Shallow residual MLPs of width 64, 256 and 768 are pretrained briefly on upright digits (cached
under bench/cache/) and fine-tuned on the rotated digits with the head frozen, so only the
adapters (on the embedding and every block linear) adapt. Each of GiVA (Vr, r=8), giva-fx random
bases (r=8) and PEFT VeRA (r=64) runs at a low learning rate (1e-3) with every seed, and searches
its tuned learning rate with seed 0 (`bench.search`, from the calibrated rate below, until the best
test loss at both step counts is bracketed) and then runs every seed at the best for each step
count. The gap in test loss (cross-entropy) is read at two step counts, at the low learning rate
("low") and at each method's best learning rate for that step count ("tuned").

    python -m bench --only width [--quick]
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
from bench.tasks import MLP_PRETRAIN_STEPS, pretrained_mlp

GIVA, RANDOM, VERA = Method("giva", 8, "Vr"), Method("random", 8), Method("vera", 64)
METHODS = (GIVA, RANDOM, VERA)
LOW = 1e-3
#: where each search starts: the tuned best (mean of 3 seeds) at every width and both step counts in
#: the last run with a fixed grid (bench/results/width_sweep.md of 2026-12-04 23:22, grid 1e-3..3e-1;
#: VeRA's one exception: 0.1 at width 768 after 150 steps)
CALIBRATED = {"giva": 1e-1, "random": 1e-1, "vera": 3e-2}


@dataclass(frozen=True)
class Sweep:
    widths: tuple[int, ...]
    seeds: int
    checkpoints: tuple[int, ...]  # the last is the run length
    eval_every: int  # divides every checkpoint
    quick: bool

    def search(self, method: Method) -> Search:
        """The quick run tries the low and the calibrated learning rate only."""
        start = CALIBRATED[method.family]
        return Search((LOW, start) if self.quick else rungs(*LR_BOUNDS[method.family]), start)

    def spec(self, width: int, method: Method, lr: float, seed: int) -> RunSpec:
        return RunSpec(f"digits_mlp_w{width}", method, lr, seed, self.checkpoints[-1], self.eval_every)

    def least_runs(self) -> list[RunSpec]:
        """The runs every (width, method) makes at least: the low rate with every seed, the search's
        first round, every seed at its start."""
        specs = {}
        for w in self.widths:
            for m in METHODS:
                search = self.search(m)
                for spec in ([self.spec(w, m, LOW, s) for s in range(self.seeds)]
                             + [self.spec(w, m, lr, 0) for lr in search.first()]
                             + [self.spec(w, m, search.start, s) for s in range(self.seeds)]):
                    specs[spec.key()] = spec
        return list(specs.values())


FULL = Sweep((64, 256, 768), seeds=3, checkpoints=(150, 450), eval_every=150, quick=False)
QUICK = Sweep((64, 256), seeds=1, checkpoints=(20, 60), eval_every=20, quick=True)


def _at(record: dict, step: int, key: str = "curve_loss") -> float:
    values = dict((s, v) for s, v in record[key])
    return values.get(step, math.inf)


@dataclass
class Cell:
    """One method at one width, learning rate and step: test loss and accuracy over seeds."""

    losses: list[float]
    accs: list[float]

    @property
    def loss(self) -> tuple[float, float]:
        return mean_sd(self.losses)


@dataclass
class Tuning:
    """One method at one width: its search (seed 0) and every run, by (learning rate, seed)."""

    width: int
    method: Method
    search: Search
    runs: dict[tuple[float, int], dict] = field(default_factory=dict)

    def cell(self, lr: float, step: int) -> Cell:
        records = [r for (r_lr, _), r in sorted(self.runs.items()) if r_lr == lr]
        return Cell([_at(r, step) for r in records], [_at(r, step, "curve") for r in records])


def _tune(sweep: Sweep, pool: Pool, tuning: Tuning) -> None:
    """Every seed at the low rate; the search round by round; then every seed at each best."""
    w, m, search = tuning.width, tuning.method, tuning.search

    def keep(record: dict) -> None:
        tuning.runs[(record["lr"], record["seed"])] = record

    def submit_round(lrs: list[float]) -> None:
        pending = set(lrs)

        def on_record(record: dict) -> None:
            keep(record)
            search.add(record["lr"], [_at(record, step) for step in sweep.checkpoints])
            pending.discard(record["lr"])
            if pending:
                return
            if more := search.next():
                submit_round(more)
                return
            for lr in search.bests():
                for seed in range(1, sweep.seeds):
                    pool.submit(sweep.spec(w, m, lr, seed), keep)

        for lr in lrs:
            pool.submit(sweep.spec(w, m, lr, 0), on_record)

    for seed in range(sweep.seeds):
        pool.submit(sweep.spec(w, m, LOW, seed), keep)
    submit_round(search.first())


def run_sweep(sweep: Sweep, pool: Pool) -> list[Tuning]:
    tunings = [Tuning(w, m, sweep.search(m)) for w in sweep.widths for m in METHODS]
    for tuning in tunings:
        _tune(sweep, pool, tuning)
    pool.run()
    return tunings


def _gap(a: Cell, b: Cell) -> tuple[float, float]:
    """b's loss minus a's (positive: a is better) and its standard error."""
    (ma, sa), (mb, sb) = a.loss, b.loss
    return mb - ma, math.sqrt(sa**2 / len(a.losses) + sb**2 / len(b.losses))


def analyse(tunings: Sequence[Tuning], sweep: Sweep) -> list[dict]:
    rows = []
    for width in sweep.widths:
        mine = {t.method: t for t in tunings if t.width == width}
        for regime in ("low", "tuned"):
            for i, step in enumerate(sweep.checkpoints):
                lrs = {m: LOW if regime == "low" else mine[m].search.best(i) for m in METHODS}
                picked = {m: (lrs[m], mine[m].cell(lrs[m], step)) for m in METHODS}
                rows.append({"width": width, "regime": regime, "step": step, "picked": picked,
                             "vs_random": _gap(picked[GIVA][1], picked[RANDOM][1]),
                             "vs_vera": _gap(picked[GIVA][1], picked[VERA][1])})
    return rows


def _fmt_cell(lr: float, cell: Cell) -> str:
    m, s = cell.loss
    acc = sum(cell.accs) / len(cell.accs)
    return f"{m:.3f} ± {s:.3f} ({100 * acc:.0f}%, lr {lr:g})"


def _fmt_gap(gap: tuple[float, float]) -> str:
    value, se = gap
    if se == 0:
        return f"{value:+.3f} (one seed)"
    verdict = "GiVA better" if value > 2 * se else "GiVA worse" if value < -2 * se else "tie"
    return f"{value:+.3f} ± {se:.3f} ({verdict})"


def plot(rows: Sequence[dict], sweep: Sweep, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = ("low", "tuned")
    fig, axes = plt.subplots(len(regimes), len(sweep.checkpoints), figsize=(5.5 * len(sweep.checkpoints), 7.5),
                             squeeze=False)
    for row, regime in zip(axes, regimes):
        for ax, step in zip(row, sweep.checkpoints):
            sel = [r for r in rows if r["step"] == step and r["regime"] == regime]
            for key, label, color in (("vs_random", "random r=8 - GiVA r=8", "tab:cyan"),
                                      ("vs_vera", "VeRA r=64 - GiVA r=8", "tab:orange")):
                ax.errorbar([r["width"] for r in sel], [r[key][0] for r in sel], [2 * r[key][1] for r in sel],
                            fmt="o-", color=color, capsize=3, label=label)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(sweep.widths), [str(w) for w in sweep.widths])
            ax.set_xlabel("model width")
            ax.set_title(f"{regime} learning rate, after {step} steps", fontsize=10)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("test-loss gap (> 0: GiVA better), ±2 se")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Gradient bases vs random bases by width (digits MLP, rotated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_search(tuning: Tuning, sweep: Sweep) -> str:
    search = tuning.search
    tried = ", ".join(f"{lr:g}: " + "/".join(f"{v:.3f}" for v in search.scores[lr]) for lr in sorted(search.scores))
    edges = [] if sweep.quick else [str(step) for i, step in enumerate(sweep.checkpoints) if search.at_bound(i)]
    return tried + (f" (best on the bound at step {', '.join(edges)})" if edges else "")


def report(rows: Sequence[dict], tunings: Sequence[Tuning], sweep: Sweep, load: tuple[float, float, float],
           wall_s: float, pool: Pool) -> str:
    head = ["width", "lr", "step", "GiVA Vr r=8", "random r=8", "VeRA r=64", "random - GiVA", "VeRA - GiVA"]
    body = [[r["width"], r["regime"], r["step"],
             *(_fmt_cell(*r["picked"][m]) for m in METHODS),
             _fmt_gap(r["vs_random"]), _fmt_gap(r["vs_vera"])] for r in rows]
    searches = [[t.width, t.method.name, _fmt_search(t, sweep)] for t in tunings]
    runs = f"{pool.computed} training runs" + (f", {pool.reused} stored ones reused (--reuse)" if pool.reused else "")
    tuned = ("the calibrated learning rate (quick run: no search)" if sweep.quick else
             "each method's best learning rate for that step count, from a seed-0 search (from a calibrated "
             "rate, one half-decade rung outward at a time until the best at both step counts is bracketed "
             "by worse rates or stands on the bound, 1e-3..1), then every seed there")
    checkpoints = "/".join(str(c) for c in sweep.checkpoints)
    return "\n".join([
        header("Width sweep: gradient bases vs random bases and VeRA at 8x rank", command_line(), load, 1),
        f"Residual MLPs (embedding + 2 blocks of width x width linears) pretrained {MLP_PRETRAIN_STEPS} steps on "
        f"upright digits, fine-tuned on digits turned by 90 degrees with the head frozen; adapters on the "
        f"embedding and every block linear. Test loss (cross-entropy; accuracy in brackets), mean ± sd over "
        f"{sweep.seeds} seeds. `low`: learning rate {LOW:g} for every method; `tuned`: {tuned}. Gaps: the other "
        f"method's loss minus GiVA's ± standard error; 'tie' within 2 standard errors. Wall time "
        f"{wall_s / 60:.1f} min, {runs}.",
        "", markdown_table(head, body), "", "![width sweep](width_sweep.png)", "",
        f"Learning rates tried (seed 0; test loss after {checkpoints} steps):", "",
        markdown_table(["width", "method", "learning rate: loss"], searches), ""])


def main(quick: bool, jobs: int, reuse: bool) -> Path:
    sweep = QUICK if quick else FULL
    load, start = os.getloadavg(), time.perf_counter()
    for width in sweep.widths:  # pretrain (or load) once, before the pool starts its workers
        pretrained_mlp(width)
    pool = Pool(jobs, reuse=reuse)
    tunings = run_sweep(sweep, pool)
    rows = analyse(tunings, sweep)
    out = results_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, sweep, out / "width_sweep.png")
    path = out / "width_sweep.md"
    write(path, report(rows, tunings, sweep, load, time.perf_counter() - start, pool))
    return path
