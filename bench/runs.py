"""One fine-tuning run (task, method, learning rate, seed) -> a plain record, and a pool to run many.

Every run uses the same loop: AdamW (fused, no weight decay), linear warm-up over the first 5% of steps
then a constant learning rate (so a curve can be read at any step count), gradients clipped to
norm 1, the task's metric on its fixed evaluation set at the first step, every `eval_every` steps
and at the last; the training loss of every step. A run that diverges (non-finite loss) stops and
keeps the metric it reached, marked `diverged`.

Runs are independent processes with one torch thread each: a run's numbers do not depend on how
many run beside it, only its wall time does. Records are stored under bench/cache/runs/, keyed by
the run's settings, so `--reuse` can take them instead of training again.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from bench.common import CACHE, quiet, write
from bench.methods import Method, build, relative_step_cost
from bench.tasks import task as get_task

RUN_FORMAT = 2  # bump when the training loop changes, so cached records are not reused (2: fused AdamW)


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
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0, fused=True)  # one kernel, not one per tensor
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


def estimated_s(spec: RunSpec) -> float:
    """Roughly how long `spec` takes on one quiet core (its steps, evaluations and build), from the
    task's measured step time: it orders the pool (longest first) and feeds the plan line."""
    t = get_task(spec.task)
    evaluations = spec.steps // spec.eval_every + 1  # the first and every eval_every-th step
    return spec.steps * t.step_s * relative_step_cost(spec.method) + evaluations * t.eval_s + t.build_s


def estimate(specs: Sequence[RunSpec]) -> tuple[int, float]:
    """(how many runs `specs` are, their estimated seconds on one quiet core) for the plan line."""
    return len(specs), sum(estimated_s(spec) for spec in specs)


class Pool:
    """Training runs in `jobs` worker processes (one torch thread each), longest first.

    `submit(spec, then)` queues a run and calls `then(record)` in this process once it is done, so a
    callback can submit the runs that depend on it (the next learning rate of a search, the other
    seeds at the best one) while the workers stay busy with the rest. A spec submitted twice runs
    once; with `reuse`, a record stored by an earlier run with the same settings is taken as is."""

    def __init__(self, jobs: int, *, reuse: bool, log: bool = True) -> None:
        self.jobs, self.reuse, self.log = max(1, jobs), reuse, log
        self.done: dict[str, dict] = {}
        self.waiting: dict[str, list[Callable[[dict], None]]] = {}
        self.queue: list[tuple[float, int, RunSpec]] = []  # heap: longest first, then first submitted
        self.ready: list[tuple[Callable[[dict], None], dict]] = []
        self.computed = self.reused = 0
        self._order = itertools.count()

    def submit(self, spec: RunSpec, then: Callable[[dict], None]) -> None:
        key = spec.key()
        if key in self.done:
            self.ready.append((then, self.done[key]))
        elif key in self.waiting:
            self.waiting[key].append(then)
        elif self.reuse and (path := _cached(spec)).exists():
            self.done[key] = _from_json(json.loads(path.read_text()))
            self.reused += 1
            self.ready.append((then, self.done[key]))
        else:
            self.waiting[key] = [then]
            heapq.heappush(self.queue, (-estimated_s(spec), next(self._order), spec))

    def run(self) -> None:
        """Until no run is queued or running (callbacks included)."""
        start = time.perf_counter()
        running: dict[Future, RunSpec] = {}
        executor: ProcessPoolExecutor | None = None
        try:
            while True:
                while self.ready:
                    then, record = self.ready.pop(0)
                    then(record)
                while self.queue and len(running) < self.jobs:
                    if executor is None:
                        executor = ProcessPoolExecutor(max_workers=self.jobs, mp_context=get_context("spawn"),
                                                       initializer=_worker_init)
                    spec = heapq.heappop(self.queue)[2]
                    running[executor.submit(_run_and_store, spec)] = spec
                if not running:
                    if self.ready:
                        continue
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    spec = running.pop(future)
                    record = _from_json(future.result())
                    key = spec.key()
                    self.done[key] = record
                    self.computed += 1
                    self.ready += [(then, record) for then in self.waiting.pop(key)]
                    if self.log:
                        print(f"  [{self.computed} run, {len(self.queue) + len(running)} queued "
                              f"{time.perf_counter() - start:5.0f}s] {spec.task} {spec.method.name} "
                              f"lr={spec.lr:g} seed={spec.seed}: {record['final']:.4f} "
                              f"({record['build_s'] + record['train_s']:.0f}s)", flush=True)
        finally:
            if executor is not None:
                executor.shutdown(cancel_futures=True)


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))
