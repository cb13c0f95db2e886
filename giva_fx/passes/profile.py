"""Profile: dL/dW for the matched weights only, averaged over the sample batches.

Only the matched weights require grad while profiling, so nothing else keeps a `.grad`. A
post-accumulate hook hands each weight's gradient to `on_gradient` as soon as it is final (during
the last batch's backward) and drops it, so peak extra memory is about one weight gradient (plus,
with several batches, the running sums). Batches run through `passes.recompute`'s copy of the
graph, which keeps only block inputs for the backward, so activations do not dominate either.
Profiling runs in eval mode (no dropout), so bases are deterministic; `profiling` restores modes
and flags even when the loss raises.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from giva_fx.batches import Batch
from giva_fx.errors import BatchError
from giva_fx.loss import LossFn, batch_loss
from giva_fx.passes.mode import set_training
from giva_fx.passes.recompute import recomputed

GradientSink = Callable[[str, "torch.Tensor | None"], None]


@contextlib.contextmanager
def profiling(gm: fx.GraphModule, names: Sequence[str]) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Enable grad for the named weights, eval mode; undo both on exit."""
    params = {n: gm.get_parameter(n) for n in names}
    was_training = gm.training
    set_training(gm, False)
    try:
        for p in params.values():
            p.requires_grad_(True)
        yield params
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        set_training(gm, was_training)


def _run(gm: fx.GraphModule, batch: Batch, index: int) -> object:
    """The model's output on one batch; capture checked only shapes, so a failure here names the batch."""
    try:
        return gm(*batch.args, **batch.kwargs)
    except Exception as exc:  # the model's own error, whatever its type
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BatchError(f"the model failed on sample batch {index}: {first}. Check the batch's dtypes and "
                         "values (e.g. token ids within the vocabulary)") from exc


def profile(
    gm: fx.GraphModule,
    batches: Sequence[Batch],
    names: Sequence[str],
    on_gradient: GradientSink,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
) -> list[float]:
    """Stream the batch-averaged gradient of each named weight to `on_gradient`; return the losses.

    `on_gradient(name, grad)` receives the (out x in or stored-layout) gradient, or None for a
    weight the loss does not reach, exactly once per weight.
    """
    delivered: set[str] = set()
    losses: list[float] = []
    with profiling(gm, names) as params:
        last = len(batches) - 1
        scale = 1.0 / len(batches)

        def hook_for(name: str) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                if step[0] == last and name not in delivered:
                    delivered.add(name)
                    on_gradient(name, p.grad.mul_(scale) if scale != 1.0 else p.grad)
                    p.grad = None
            return hook

        runner = recomputed(gm, names)  # after `profiling` put the graph in eval form
        step = [0]
        handles = [p.register_post_accumulate_grad_hook(hook_for(n)) for n, p in params.items()]
        try:
            for step[0], batch in enumerate(tqdm(batches, desc="giva-fx: profiling gradients",
                                                 disable=not progress or len(batches) < 2, leave=False)):
                loss = batch_loss(_run(runner, batch, step[0]), batch, loss_fn)
                if loss.requires_grad:  # else no matched weight reaches the loss: all get None
                    loss.backward()
                losses.append(loss.item())
        finally:
            for h in handles:
                h.remove()
        for name in names:
            if name not in delivered:
                on_gradient(name, None)
    return losses
