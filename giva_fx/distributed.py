"""Profiling under torch.distributed: bases from the global batch, bit-identical on every rank.

When a process group of several ranks is initialised, `adapt()` profiles through `synchronized`:

1. **Preflight.** One all-gather compares, across ranks, the adapted ops, the options (rank, init,
   seed, ...) and an exact checksum of the model's weights and buffers, and sums the local batch
   counts. Ranks that would compute different bases stop at once with a `ConfigError` on every
   rank (the loss function cannot be compared: pass the same one everywhere). A rank that failed
   before profiling (in its options, batches, capture or match: see `fail_together`) sends its
   error instead, so the others raise `DistributedError` here rather than wait for it.
2. **Gradients, in one fixed order.** The profile pass hands over each weight's gradient during the
   last backward (in backward order) or, for a weight the loss does not reach, as None after it.
   Gradients wait in a buffer until their turn in a fixed order (reverse graph order, which is
   nearly the backward order, so the buffer rarely holds more than a few); then every rank takes
   part in the same two collectives: a small all-reduce of (reached, failed) flags, and, unless no
   rank reached the weight, an in-place float32 all-reduce of ``gradient * n_local / n_total``.
   Each rank averages its own batches first, so with equal batch counts this is "average again"
   and equals the mean over all batches (with equal batch sizes and a mean loss, the gradient of
   the mean loss on the concatenated batch). A rank that did not reach a weight adds zeros.
3. **Bases, sharded.** Each op's SVD runs once, on the rank that owns it (ops are dealt to the
   least loaded rank by weight size); the others drop the reduced gradient at once. The owner
   runs it inside the hook, so the others may wait for it at the next collective: sharding
   divides the SVD work by the number of ranks, the wall time gains less (bench/distributed.py).
4. **Commit and exchange.** A last flags all-reduce confirms every rank finished; then each rank
   broadcasts the bases it computed as raw bytes, so every rank holds bit-identical bases whatever
   its BLAS threads or hardware (randomness is seeded per op from (seed, weight name) anyway).

A rank that fails while profiling (its loss raises, say) joins the next collective of the fixed
sequence with its failed flag set, so every rank stops at the same collective with a clear error
(the failing rank's own exception; `DistributedError` naming it elsewhere) and no rank hangs or
leaves a collective half done. A rank that fails before profiling does the same at the preflight,
so the others stop as soon as they get there themselves. A rank that dies outright surfaces as a
backend error, reraised as `DistributedError`.

Memory: like the single-process pass (about one extra gradient), plus the gradients that arrive
out of the fixed order, plus a float32 copy of the gradient being reduced when the weight is not
float32. On BERT-base the sink never held more than the one gradient it was reducing: the
fixed order matches the backward order there.

Training: wrap the adapted model in `DistributedDataParallel` as it is. Only parameters that
require grad enter DDP's reducer, so its buckets hold the adapter vectors (and `train=`
parameters) alone. DDP's constructor still broadcasts every parameter and buffer from rank 0 once
(frozen weights too, into the storage they share with the user's model; identical on every rank
after the preflight, so nothing changes). `save_adapter` writes on rank 0 only (`on_rank_zero`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from giva_fx.errors import ConfigError, GivaError
from giva_fx.passes.bases import Bases
from giva_fx.passes.match import WeightOp
from giva_fx.passes.profile import GradientSink

log = logging.getLogger(__name__)

_MESSAGE_BYTES = 2048  # room for each rank's failure message
_PREFLIGHT_INTS = 3  # ops and options CRC, weights checksum, batch count


class DistributedError(GivaError, RuntimeError):
    """Another rank failed, or a collective broke, so this rank cannot go on either."""


def world() -> tuple[int, int] | None:
    """(rank, world size) when torch.distributed runs with several ranks, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def _flag_device() -> torch.device:
    """Where small control tensors live: NCCL takes only CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _message_tensor(message: str, device: torch.device) -> torch.Tensor:
    """`message` as a fixed-size, zero-padded uint8 tensor (cut at _MESSAGE_BYTES), to all-gather."""
    data = list(message.encode()[:_MESSAGE_BYTES])
    return torch.tensor(data + [0] * (_MESSAGE_BYTES - len(data)), dtype=torch.uint8, device=device)


def _message_text(data: torch.Tensor) -> str:
    return bytes(data.cpu().tolist()).rstrip(b"\0").decode(errors="replace")


def _broken(rank: int, what: str, exc: RuntimeError) -> DistributedError:
    """A backend error (the backends raise RuntimeError subclasses) as the error this rank raises."""
    return DistributedError(f"rank {rank}: a collective of {what} failed ({str(exc).splitlines()[0]}); "
                            "another rank probably exited: see its log")


def on_rank_zero(action: Callable[[], None], what: str) -> None:
    """Run `action` once: in a single process, or on rank 0 of several, which then tells every rank
    whether it succeeded, so no rank goes on to read, say, a file that was never written."""
    here = world()
    if here is None:
        action()
        return
    failure: Exception | None = None
    if here[0] == 0:
        try:
            action()
        except Exception as exc:  # reraised below, after the other ranks have been told
            failure = exc
    ok = torch.tensor([failure is None], dtype=torch.int64, device=_flag_device())
    dist.broadcast(ok, src=0)
    if failure is not None:
        raise failure
    if not ok.item():
        raise DistributedError(f"rank 0 failed {what}; see its error")


def weights_checksum(tensors: Sequence[torch.Tensor]) -> int:
    """An exact checksum of the tensors' bits: integer sums do not depend on reduction order."""
    total = 0
    for t in tensors:
        flat = t.detach().contiguous().reshape(-1)
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        total += int(flat.view(ints).sum(dtype=torch.int64))
    return total % (2**62)


def owners(ops: Sequence[WeightOp], world_size: int) -> dict[str, int]:
    """Deal each op's SVD to the rank with the least work so far (by weight size): deterministic."""
    load = [0] * world_size
    owner: dict[str, int] = {}
    for op in sorted(ops, key=lambda o: -o.out_features * o.in_features):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[op.weight_name] = rank
        load[rank] += op.out_features * op.in_features
    return owner


def _pack(bases: dict[str, Bases]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bases as JSON metadata plus their tensors' raw bytes, for a bit-exact broadcast."""
    meta, payload = [], []
    for name, b in bases.items():
        entry: dict[str, object] = {"name": name}
        for f in dataclasses.fields(b):
            value = getattr(b, f.name)
            if isinstance(value, torch.Tensor):
                entry[f.name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
                payload.append(value.detach().contiguous().reshape(-1).view(torch.uint8))
            else:
                entry[f.name] = value
        meta.append(entry)
    data = torch.cat([t.cpu() for t in payload]) if payload else torch.empty(0, dtype=torch.uint8)
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8), data


def _unpack(meta: bytes, data: torch.Tensor) -> dict[str, Bases]:
    """The inverse of `_pack`: bases with exactly the bits the owner computed, on data's device."""
    out: dict[str, Bases] = {}
    offset = 0
    for entry in json.loads(meta.decode()):
        name = entry.pop("name")
        fields = {}
        for key, value in entry.items():
            if isinstance(value, dict) and "dtype" in value:
                dtype = getattr(torch, value["dtype"])
                n = int(torch.Size(value["shape"]).numel()) * dtype.itemsize
                fields[key] = data[offset:offset + n].clone().view(dtype).reshape(value["shape"])
                offset += n
            else:
                fields[key] = value
        out[name] = Bases(**fields)
    return out


class _GradientSync:
    """The gradient sink of one rank: averages gradients across ranks in a fixed order and hands
    each global gradient to `compute` on the rank that owns the op (see the module docstring)."""

    def __init__(self, ops: Sequence[WeightOp], compute: GradientSink, scale: float, rank: int,
                 world_size: int, device: torch.device, flag_device: torch.device) -> None:
        self.order = list(reversed(ops))
        self.owner = owners(ops, world_size)
        self.compute, self.scale = compute, scale
        self.rank, self.world_size = rank, world_size
        self.device, self.flag_device = device, flag_device
        self.step = 0  # index into order; len(order) is the commit
        self.pending: dict[str, torch.Tensor | None] = {}
        self.stopped = False  # every rank has stopped (a failure was agreed), or a collective broke
        self.peak_pending_bytes = 0
        self.comm_s = 0.0

    def __call__(self, name: str, grad: torch.Tensor | None) -> None:
        self.pending[name] = grad
        held = sum(g.numel() * g.element_size() for g in self.pending.values() if g is not None)
        self.peak_pending_bytes = max(self.peak_pending_bytes, held)
        while self.step < len(self.order) and self.order[self.step].weight_name in self.pending:
            op = self.order[self.step]
            self._reduce(op, self.pending.pop(op.weight_name))

    def _collective(self, fn: Callable[..., object], *args: object) -> None:
        start = time.perf_counter()
        try:
            fn(*args)
        except RuntimeError as exc:
            self.stopped = True
            raise _broken(self.rank, "gradient profiling", exc) from exc
        finally:
            self.comm_s += time.perf_counter() - start

    def _flags(self, reached: bool, failure: str | None = None) -> int:
        """All-reduce (reached, failed); stop every rank together if any failed. Returns how many
        ranks reached the weight."""
        flags = torch.tensor([float(reached), float(failure is not None)], device=self.flag_device)
        self._collective(dist.all_reduce, flags)
        if flags[1].item() > 0:
            self.stopped = True
            failures = self._failures(failure or "")
            if failure is None:
                detail = "; ".join(f"rank {r}: {m}" for r, m in failures.items())
                raise DistributedError(f"rank {self.rank} stopped profiling gradients because another rank "
                                       f"failed ({detail})")
        return int(flags[0].item())

    def _failures(self, message: str) -> dict[int, str]:
        """Every rank's failure message (empty for ranks that did not fail), by rank."""
        mine = _message_tensor(message, self.flag_device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._collective(dist.all_gather, gathered, mine)
        texts = {r: _message_text(t) for r, t in enumerate(gathered)}
        return {r: m for r, m in texts.items() if m}

    def _reduce(self, op: WeightOp, grad: torch.Tensor | None) -> None:
        total: torch.Tensor | None = None
        if self._flags(reached=grad is not None):
            if grad is None:
                total = torch.zeros(op.weight_shape, dtype=torch.float32, device=self.device)
            else:
                total = grad.float().mul_(self.scale)  # in place for float32 gradients: no copy
            self._collective(dist.all_reduce, total)
        self.step += 1
        if self.owner[op.weight_name] == self.rank:
            self.compute(op.weight_name, total)

    def abandon(self, exc: Exception) -> None:
        """After a local failure: join the next collective with the failed flag, so every rank stops
        there too. Nothing to do if the ranks already stopped together."""
        if self.stopped:
            return
        try:
            self._flags(reached=False, failure=_describe(exc))
        except DistributedError as broken:  # the caller re-raises the original failure
            log.warning("rank %d could not tell the other ranks it failed: %s", self.rank, broken)

    def commit(self, bases: dict[str, Bases]) -> None:
        """Confirm every rank finished, then give every rank the bases each owner computed."""
        if self.step != len(self.order):
            missing = [op.weight_name for op in self.order[self.step:]]
            raise RuntimeError(f"profiling ended without a gradient for {missing[:3]}")
        self._flags(reached=True)
        for src in range(self.world_size):
            ours = src == self.rank
            meta, data = _pack({n: b for n, b in bases.items() if self.owner.get(n) == src} if ours else {})
            meta = self._broadcast_bytes(meta if ours else None, src)
            data = self._broadcast_bytes(data if ours else None, src)
            if not ours:
                bases.update(_unpack(bytes(meta.cpu().tolist()), data.to(self.device)))

    def _broadcast_bytes(self, data: torch.Tensor | None, src: int) -> torch.Tensor:
        """Broadcast a uint8 tensor of any length from `src` (others pass None)."""
        size = torch.tensor([-1 if data is None else data.numel()], dtype=torch.int64, device=self.flag_device)
        self._collective(dist.broadcast, size, src)
        out = data.to(self.flag_device) if data is not None else \
            torch.empty(int(size.item()), dtype=torch.uint8, device=self.flag_device)
        if out.numel():
            self._collective(dist.broadcast, out, src)
        return out


def _exchange(values: Sequence[int], failure: str | None, rank: int, world_size: int,
              device: torch.device) -> list[tuple[list[int], str]]:
    """The preflight all-gather: this rank's description (`_PREFLIGHT_INTS` integers) or, for a
    rank that failed before profiling, its error; returns every rank's (integers, error or "")."""
    ints = torch.tensor(values, dtype=torch.int64).view(torch.uint8).to(device)
    mine = torch.cat([ints, _message_tensor(failure or "", device)])
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    try:
        dist.all_gather(gathered, mine)
    except RuntimeError as exc:
        raise _broken(rank, "the preflight", exc) from exc
    return [(t[:ints.numel()].cpu().view(torch.int64).tolist(), _message_text(t[ints.numel():])) for t in gathered]


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Run the stages before profiling; under torch.distributed, a rank that fails in them joins the
    preflight with its error before re-raising it, so the other ranks stop there with a
    `DistributedError` naming it instead of waiting until the process group times out. Free in a
    single process: nothing runs unless the block raises."""
    try:
        yield
    except Exception as exc:
        here = world()
        if here is not None:
            try:
                _exchange([0] * _PREFLIGHT_INTS, _describe(exc), *here, _flag_device())
            except DistributedError as broken:  # the original failure is the one to raise
                log.warning("rank %d could not tell the other ranks it failed: %s", here[0], broken)
        raise


def _preflight(gm: fx.GraphModule, ops: Sequence[WeightOp], config: object, n_batches: int,
               rank: int, world_size: int, device: torch.device) -> float:
    """Check that every rank got here and adapts the same ops of the same model with the same
    options; return this rank's weight in the global average (its share of all batches)."""
    described = json.dumps([repr(config), [(op.weight_name, op.kind, op.layout, list(op.weight_shape))
                                           for op in ops]])
    checksum = weights_checksum([*gm.parameters(), *gm.buffers()])
    gathered = _exchange([zlib.crc32(described.encode()), checksum, n_batches], None, rank, world_size, device)
    failures = "; ".join(f"rank {r}: {m}" for r, (_, m) in enumerate(gathered) if m)
    if failures:
        raise DistributedError(f"rank {rank} stopped before profiling gradients because another rank failed "
                               f"({failures})")
    rows = [values for values, _ in gathered]
    for r, (ops_crc, weights, _) in enumerate(rows):
        if ops_crc != rows[0][0]:
            raise ConfigError(
                f"rank {r} adapts other ops or uses other options than rank 0 (rank, init, seed, targets, "
                f"...); every rank must call adapt() on the same model with the same options ({config})"
            )
        if weights != rows[0][1]:
            raise ConfigError(
                f"the model's weights or buffers differ between rank {r} and rank 0; every rank must start "
                "from the same weights (load the same checkpoint, or seed before building a model)"
            )
    return n_batches / sum(row[2] for row in rows)


@contextlib.contextmanager
def synchronized(gm: fx.GraphModule, ops: Sequence[WeightOp], config: object, n_batches: int,
                 compute: GradientSink, bases: dict[str, Bases]) -> Iterator[GradientSink]:
    """The gradient sink to profile through: `compute` itself in a single process; under
    torch.distributed, a sink that averages gradients across ranks and, on exit, fills `bases`
    with the same bases on every rank. `compute(name, grad)` must store its result in `bases`."""
    here = world()
    if here is None:
        yield compute
        return
    rank, world_size = here
    device = gm.get_parameter(ops[0].weight_name).device if ops else torch.device("cpu")
    flag_device = _flag_device()
    scale = _preflight(gm, ops, config, n_batches, rank, world_size, flag_device)
    sync = _GradientSync(ops, compute, scale, rank, world_size, device, flag_device)
    try:
        yield sync
        sync.commit(bases)
    except Exception as exc:
        sync.abandon(exc)
        raise
    log.debug("rank %d: %d ops, %.3f s in collectives, peak gradients held %.1f MB", rank, len(ops),
              sync.comm_s, sync.peak_pending_bytes / 2**20)
