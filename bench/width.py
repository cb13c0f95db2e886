"""Width sweep: where do gradient bases start to pay off? GiVA vs random bases vs VeRA at 8r.

Shallow residual MLPs of width 64, 256 and 768 are pretrained briefly on upright digits (cached
under bench/cache/) and fine-tuned on the rotated digits with the head frozen, so only the
adapters (on the embedding and every block linear) adapt. Each of GiVA (Vr, r=8), giva-fx random
bases (r=8) and PEFT VeRA (r=64) runs a learning-rate grid with every seed; the gap in test loss
(cross-entropy) is read at two step counts, at the lowest learning rate of the grid ("low") and at
each method's best learning rate for that step count ("tuned").

    python -m bench --only width [--quick]
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
from bench.methods import Method
from bench.runs import RunSpec, run_all
from bench.tasks import MLP_PRETRAIN_STEPS, pretrained_mlp

GIVA, RANDOM, VERA = Method("giva", 8, "Vr"), Method("random", 8), Method("vera", 64)


@dataclass(frozen=True)
class Sweep:
    widths: tuple[int, ...]
    grid: tuple[float, ...]
    seeds: int
    checkpoints: tuple[int, ...]  # the last is the run length
    eval_every: int


FULL = Sweep((64, 256, 768), (1e-3, 1e-2, 3e-2, 1e-1, 3e-1), seeds=3, checkpoints=(150, 450), eval_every=25)
QUICK = Sweep((64, 256), (1e-3, 3e-2), seeds=1, checkpoints=(20, 60), eval_every=20)


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


def cells(records: Sequence[dict], sweep: Sweep) -> dict[tuple[int, Method, float, int], Cell]:
    grouped: dict[tuple[int, Method, float, int], Cell] = defaultdict(lambda: Cell([], []))
    for r in records:
        width = int(r["task"].removeprefix("digits_mlp_w"))
        for step in sweep.checkpoints:
            cell = grouped[(width, r["method"], r["lr"], step)]
            cell.losses.append(_at(r, step))
            cell.accs.append(_at(r, step, "curve"))
    return grouped


def _pick(table: dict, width: int, method: Method, step: int, regime: str, sweep: Sweep) -> tuple[float, Cell]:
    if regime == "low":
        return sweep.grid[0], table[(width, method, sweep.grid[0], step)]
    lr = min(sweep.grid, key=lambda lr: table[(width, method, lr, step)].loss[0])
    return lr, table[(width, method, lr, step)]


def _gap(a: Cell, b: Cell) -> tuple[float, float]:
    """b's loss minus a's (positive: a is better) and its standard error."""
    (ma, sa), (mb, sb) = a.loss, b.loss
    return mb - ma, math.sqrt(sa**2 / len(a.losses) + sb**2 / len(b.losses))


def analyse(records: Sequence[dict], sweep: Sweep) -> list[dict]:
    table = cells(records, sweep)
    rows = []
    for width in sweep.widths:
        for regime in ("low", "tuned"):
            for step in sweep.checkpoints:
                picked = {m: _pick(table, width, m, step, regime, sweep) for m in (GIVA, RANDOM, VERA)}
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


def report(rows: Sequence[dict], sweep: Sweep, load: tuple[float, float, float], wall_s: float,
           reuse: bool) -> str:
    head = ["width", "lr", "step", "GiVA Vr r=8", "random r=8", "VeRA r=64", "random - GiVA", "VeRA - GiVA"]
    body = [[r["width"], r["regime"], r["step"],
             *(_fmt_cell(*r["picked"][m]) for m in (GIVA, RANDOM, VERA)),
             _fmt_gap(r["vs_random"]), _fmt_gap(r["vs_vera"])] for r in rows]
    return "\n".join([
        header("Width sweep: gradient bases vs random bases and VeRA at 8x rank", command_line(), load, 1),
        f"Residual MLPs (embedding + 2 blocks of width x width linears) pretrained {MLP_PRETRAIN_STEPS} steps on upright digits, "
        f"fine-tuned on digits turned by 90 degrees with the head frozen; adapters on the embedding and every "
        f"block linear. Test loss (cross-entropy; accuracy in brackets), mean ± sd over {sweep.seeds} seeds; "
        f"learning-rate grid {list(sweep.grid)} for every method with every seed. `low`: the grid's lowest "
        f"learning rate; `tuned`: each method's best for that step count. Gaps: the other method's loss minus "
        f"GiVA's ± standard error; 'tie' within 2 standard errors. Wall time {wall_s / 60:.1f} min{' (stored runs reused: see --reuse)' if reuse else ''}.",
        "", markdown_table(head, body), "", "![width sweep](width_sweep.png)", ""])


def main(quick: bool, jobs: int, reuse: bool) -> Path:
    sweep = QUICK if quick else FULL
    load, start = os.getloadavg(), time.perf_counter()
    for width in sweep.widths:  # pretrain (or load) once, before the pool forks its runs
        pretrained_mlp(width)
    specs = [RunSpec(f"digits_mlp_w{w}", m, lr, seed, sweep.checkpoints[-1], sweep.eval_every)
             for w in sorted(sweep.widths, reverse=True) for m in (GIVA, RANDOM, VERA)
             for lr in sweep.grid for seed in range(sweep.seeds)]
    print(f"width: {len(specs)} runs", flush=True)
    records = run_all(specs, jobs=jobs, reuse=reuse)
    rows = analyse(records, sweep)
    out = results_dir(quick)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, sweep, out / "width_sweep.png")
    path = out / "width_sweep.md"
    write(path, report(rows, sweep, load, time.perf_counter() - start, reuse))
    return path
