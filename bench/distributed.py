"""adapt() on one process vs two (torch.distributed, gloo, CPU) for a BERT-base-sized model.

    OMP_NUM_THREADS=1 python bench/distributed.py [--batch 4] [--seq 64] [--repeats 2]

BertForSequenceClassification with `BertConfig()` defaults (12 layers x 768, random weights,
seeded), rank 8, init Vr. Each rank profiles one batch of `--batch` sequences of `--seq` tokens;
the single-process runs get one batch, or both ranks' batches (the same global data). Two ways
to turn the averaged gradients into bases are compared:

* shard (what adapt() does): each op's SVD runs on one rank, the bases are broadcast as bytes;
* replicate: every rank runs every SVD, nothing is exchanged (patched in here, for comparison).

Reported per configuration: the wall time of adapt() (the slowest rank, best of `--repeats`),
adapt()'s own breakdown (capture, profile incl. collectives, bases = the SVDs this rank ran), the
time spent inside collectives (waiting for the other rank included), and the peak bytes of
gradients the sink held (the one being reduced included; more means gradients arrived out of order).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import statistics
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model_and_batches(batch: int, seq: int, n: int) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig()).eval()
    batches = []
    for j in range(n):
        gen = torch.Generator().manual_seed(100 + j)
        ids = torch.randint(1000, 20000, (batch, seq), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.randint(0, 2, (batch,), generator=gen)})
    return model, batches


class _SyncStats(logging.Handler):
    """Picks up the per-rank statistics giva_fx.distributed logs at DEBUG level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.comm_s = 0.0
        self.peak_mb = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        if "collectives" in record.msg:
            _, _, self.comm_s, self.peak_mb = record.args


def _replicate_svds() -> None:
    """Every rank computes every op's bases itself; nothing to exchange afterwards."""
    import giva_fx.distributed as gd

    gd.owners = lambda ops, world_size: {op.weight_name: dist.get_rank() for op in ops}
    gd._GradientSync.commit = lambda self, bases: self._flags(reached=True)


def _adapt_once(batches: list[dict[str, torch.Tensor]], model: torch.nn.Module) -> dict[str, Any]:
    import giva_fx

    stats = _SyncStats()
    logger = logging.getLogger("giva_fx.distributed")
    logger.addHandler(stats)
    logger.setLevel(logging.DEBUG)
    if dist.is_initialized():
        dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    adapted = giva_fx.adapt(model, batches, rank=8, progress=False)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    logger.removeHandler(stats)
    r = adapted.report
    digest = sum(float(a.A.double().sum() + a.B.double().sum()) for a in adapted.adapters().values())
    return {"wall": wall, "cpu": cpu, "capture": r.capture_s, "profile": r.profile_s, "bases": r.bases_s,
            "comm": stats.comm_s, "peak_mb": stats.peak_mb, "digest": digest}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, strategy: str, queue: Any) -> None:
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))
        if strategy == "replicate":
            _replicate_svds()
    n = 2 if strategy == "global" else 1
    model, batches = _model_and_batches(args.batch, args.seq, max(world, n))
    mine = batches[rank:rank + 1] if world > 1 else batches[:n]
    runs = [_adapt_once(mine, model) for _ in range(args.repeats)]
    queue.put((rank, runs))
    if world > 1:
        dist.destroy_process_group()


def _run(world: int, strategy: str, args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, strategy, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return [results[r] for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    configs = [("1 process, 1 batch", 1, "local"), ("1 process, both batches", 1, "global"),
               ("2 processes, 1 batch each, shard SVDs", 2, "shard"),
               ("2 processes, 1 batch each, replicate SVDs", 2, "replicate")]
    print(f"BERT-base (BertConfig defaults), batch {args.batch} x {args.seq} tokens per rank, rank 8, Vr, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| configuration | adapt() wall s (slowest rank, best run) | CPU s per rank | capture s | profile s | "
          "bases s | in collectives s | peak gradients held by the sink MB | ranks' bases identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, world, strategy in configs:
        per_rank = _run(world, strategy, args)
        best = min(range(args.repeats), key=lambda i: max(r[i]["wall"] for r in per_rank))
        runs = [r[best] for r in per_rank]
        worst = max(runs, key=lambda run: run["wall"])
        same = "-" if world == 1 else str(len({run["digest"] for run in runs}) == 1)
        walls = [max(r[i]["wall"] for r in per_rank) for i in range(args.repeats)]
        bases = " / ".join(f"{run['bases']:.2f}" for run in runs)
        comm = " / ".join(f"{run['comm']:.2f}" for run in runs)
        cpu = " / ".join(f"{run['cpu']:.2f}" for run in runs)
        print(f"| {label} | {worst['wall']:.2f} (median {statistics.median(walls):.2f}) | {cpu} | {worst['capture']:.2f} | "
              f"{worst['profile']:.2f} | {bases} | {comm} | {max(run['peak_mb'] for run in runs):.1f} | {same} |",
              flush=True)


if __name__ == "__main__":
    main()
