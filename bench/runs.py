"""One fine-tuning run (task, method, learning rate, seed) -> a plain record, and a pool to run many.

Every run uses the same loop: AdamW (no weight decay), linear warm-up over the first 5% of steps
then a constant learning rate (so a curve can be read at any step count), gradients clipped to
norm 1, the task's metric on its fixed evaluation set every `eval_every` steps. A run that
diverges (non-finite loss) stops and keeps the metric it reached, marked `diverged`.

Runs are independent processes with one torch thread each: a run's numbers do not depend on how
many run beside it, only its wall time does.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from bench.common import CACHE, quiet, write
from bench.methods import Method, build
from bench.tasks import task as get_task

RUN_FORMAT = 1  # bump when the training loop changes, so cached records are not reused


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: Method
    lr: float
    seed: int
    steps: int
    eval_every: int

    def key(self) -> str:
        blob = json.dumps({"format": RUN_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run(spec: RunSpec) -> dict:
    """Train one method on one task; the record holds its curve and final metric."""
    task = get_task(spec.task)
    start = time.perf_counter()
    built = build(spec.method, task, spec.seed)
    build_s = time.perf_counter() - start
    model, params = built.model, built.params
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    batches = task.batches(spec.seed)
    torch.manual_seed(spec.seed)
    curve = [(0, task.evaluate(model.eval()))]
    train_loss: list[float] = []
    diverged = False
    start = time.perf_counter()
    for step in range(1, spec.steps + 1):
        model.train()
        loss = task.loss(model, next(batches))
        if not math.isfinite(loss.item()):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        train_loss.append(loss.item())
        if step % spec.eval_every == 0 or step == spec.steps:
            curve.append((step, task.evaluate(model.eval())))
    return {
        **asdict(spec), "method_name": spec.method.name, "trainable": built.trainable,
        "curve": [(s, m["metric"]) for s, m in curve], "curve_loss": [(s, m["loss"]) for s, m in curve],
        "final": curve[-1][1]["metric"], "final_loss": curve[-1][1]["loss"], "train_loss": train_loss,
        "diverged": diverged, "build_s": build_s, "train_s": time.perf_counter() - start,
    }


def _worker_init() -> None:
    quiet()
    torch.set_num_threads(1)


def _cached(spec: RunSpec) -> Path:
    return CACHE / "runs" / f"{spec.task}-{spec.key()}.json"


def _run_and_store(spec: RunSpec) -> dict:
    record = run(spec)
    write(_cached(spec), json.dumps(record))
    return record


def _from_json(record: dict) -> dict:
    """A stored record with its method as a `Method` again (hashable, comparable)."""
    return {**record, "method": Method(**record["method"])}


def run_all(specs: Sequence[RunSpec], *, jobs: int, reuse: bool, log: bool = True) -> list[dict]:
    """Records for `specs` (in order), computed `jobs` at a time; `reuse` takes stored records."""
    records: dict[int, dict] = {}
    todo = []
    for i, spec in enumerate(specs):
        path = _cached(spec)
        if reuse and path.exists():
            records[i] = _from_json(json.loads(path.read_text()))
        else:
            todo.append(i)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = {pool.submit(_run_and_store, specs[i]): i for i in todo}
        for done, future in enumerate(futures, 1):
            i = futures[future]
            records[i] = _from_json(future.result())
            if log:
                r = records[i]
                print(f"  [{done}/{len(todo)} {time.perf_counter() - start:6.0f}s] {r['task']} {r['method_name']} "
                      f"lr={r['lr']:g} seed={r['seed']}: {r['final']:.4f}", flush=True)
    return [records[i] for i in range(len(specs))]


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))
