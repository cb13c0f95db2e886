"""adapt() on one process vs two (torch.distributed, gloo, CPU) for a BERT-base-sized model.

    OMP_NUM_THREADS=1 python bench/distributed.py [--batch 4] [--seq 64] [--repeats 2] [--out FILE]

BertForSequenceClassification with `BertConfig()` defaults (12 layers x 768, random weights,
seeded), rank 8, init Vr. Each rank profiles one batch of `--batch` sequences of `--seq` tokens;
the single-process runs get one batch, or both ranks' batches (the same global data). Two ways
to turn the averaged gradients into bases are compared:

* shard (what adapt() does): each op's SVD runs once, on the rank that owns it, and the bases are
  broadcast as bytes at the end;
* replicate (patched in here): every rank runs every SVD itself, nothing is exchanged.

Reported per configuration, as medians over `--repeats` runs (of the slowest rank where one number
stands for all): the wall time of adapt(), of its capture, and of what follows the capture
(profiling, collectives and SVDs: the only part the strategies change); each rank's CPU seconds
in adapt(), seconds of SVDs it ran and seconds inside collectives (waiting for the other rank
included); the peak bytes of gradients the sink held (the one being reduced included; more would
mean gradients arrived out of the fixed order); whether the ranks' bases agreed.
Wall times on a machine shared with other jobs move with its load: the load average is printed.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench/ is a package
from bench.common import RESULTS, header, markdown_table, write  # noqa: E402


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


def _patch(strategy: str) -> None:
    """Switch giva_fx.distributed to one of the alternatives compared here."""
    import giva_fx.distributed as gd

    if strategy == "replicate":  # every rank owns every op, so there is nothing to exchange
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
    return {"wall": wall, "cpu": cpu, "capture": r.capture_s, "after_capture": r.profile_s + r.bases_s,
            "bases": r.bases_s,
            "comm": stats.comm_s, "peak_mb": stats.peak_mb, "digest": digest}


def _allreduce_only(model: torch.nn.Module) -> tuple[float, int]:
    """Seconds to all-reduce one float32 gradient per adapted weight (the 73 matrices of the encoder
    and pooler), with nothing else going on; and how many floats that is."""
    grads = [torch.zeros_like(p, dtype=torch.float32) for n, p in model.named_parameters()
             if p.dim() == 2 and "embeddings" not in n and "classifier" not in n]
    dist.barrier()
    start = time.perf_counter()
    for g in grads:
        dist.all_reduce(g)
    return time.perf_counter() - start, sum(g.numel() for g in grads)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, strategy: str, queue: Any) -> None:
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=10))
        _patch(strategy)
    n = 2 if strategy == "global" else 1
    model, batches = _model_and_batches(args.batch, args.seq, max(world, n))
    mine = batches[rank:rank + 1] if world > 1 else batches[:n]
    runs = [_adapt_once(mine, model) for _ in range(args.repeats)]
    if world > 1 and rank == 0:
        runs[0]["allreduce"] = _allreduce_only(model)
    elif world > 1:
        _allreduce_only(model)
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
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed.md", help="where the table goes")
    args = parser.parse_args()
    load = os.getloadavg()
    configs = [("1 process, 1 batch", 1, "local"), ("1 process, both batches", 1, "global"),
               ("2 processes, 1 batch each, shard SVDs", 2, "shard"),
               ("2 processes, 1 batch each, replicate SVDs", 2, "replicate")]
    rows = []
    note = ""
    for label, world, strategy in configs:
        per_rank = _run(world, strategy, args)
        def median(key: str, rank: int | None = None) -> float:  # over repeats; of the slowest rank
            return statistics.median(max(r[i][key] for r in per_rank) if rank is None else per_rank[rank][i][key]
                                     for i in range(args.repeats))

        def each(key: str) -> str:
            return " / ".join(f"{median(key, rank):.2f}" for rank in range(world))

        same = "-" if world == 1 else str(all(len({r[i]["digest"] for r in per_rank}) == 1
                                              for i in range(args.repeats)))
        peak = max(run["peak_mb"] for r in per_rank for run in r)
        rows.append([label, f"{median('wall'):.2f}", f"{median('capture'):.2f}", f"{median('after_capture'):.2f}",
                     each("cpu"), each("bases"), each("comm"), f"{peak:.1f}", same])
        print(" | ".join(rows[-1]), flush=True)
        if "allreduce" in per_rank[0][0]:
            seconds, floats = per_rank[0][0]["allreduce"]
            note = (f"gloo all-reduce of the adapted weights' gradients alone ({floats / 1e6:.1f} M float32, "
                    f"one call per weight, 2 processes): {seconds:.2f} s")
    command = "OMP_NUM_THREADS=1 python bench/distributed.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        header("adapt() under torch.distributed: 1 process vs 2 (gloo, CPU)", command.strip(), load, args.threads),
        f"BERT-base (`BertConfig()` defaults, random weights, seed 0), rank 8, init Vr, one batch of "
        f"{args.batch} x {args.seq} tokens per rank; medians of {args.repeats} runs (of the slowest rank where "
        "one number stands for all). On a 2-core machine two processes get no more CPU than one, so wall "
        "times measure contention as much as scaling; CPU seconds per rank are the fairer measure. What the "
        "columns mean, and what earlier runs showed, is in [distributed_notes.md](distributed_notes.md).",
        "",
        markdown_table(["configuration", "adapt() wall s", "capture s", "profile + bases wall s",
                        "adapt() CPU s per rank", "SVD s per rank", "in collectives s per rank",
                        "peak gradients held by the sink MB", "ranks' bases identical"], rows),
        "", note, "",
    ])
    write(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
