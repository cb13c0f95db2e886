"""`inspect_model()`: what adapting a model would touch, and what it costs next to LoRA and VeRA.

Nothing is profiled: the model is captured and matched and random bases are built (cheap), so
ranks are shown after clamping to each op's shape. Comparisons, for the selected ops:

    GiVA  rank r per op: trains r + out per op; keeps frozen bases A, B (r * (in + out) per op)
    LoRA  rank r per op: trains r * (in + out) per op
    VeRA  rank 8r (its usual setting for GiVA's budget): one shared frozen pair A (8r x max in),
          B (max out x 8r) sized to the largest op; trains 8r + out per op
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from giva_fx.adapt import adapt
from giva_fx.summary import Summary, summary

VERA_RANK_FACTOR = 8


@dataclass(frozen=True)
class MethodCost:
    """Parameters one adapter method adds: trained, and frozen but stored with the adapter."""

    method: str
    rank: int
    trainable: int
    frozen: int


@dataclass(frozen=True)
class Inspection:
    summary: Summary
    rank: int
    costs: tuple[MethodCost, ...]  # GiVA, LoRA, VeRA

    def as_dict(self) -> dict[str, Any]:
        out = self.summary.as_dict()
        for row in out["ops"]:
            del row["init"]  # inspection builds placeholder bases: their init says nothing
        return {**out, "rank": self.rank, "compare": [asdict(c) for c in self.costs]}

    def __str__(self) -> str:
        s, base = self.summary, max(self.summary.base_params, 1)
        head = f"{'weight':<52} {'kind':<6} {'shape':<14} {'rank':>4} {'trainable':>9} {'LoRA':>9}"
        lines = [head, "-" * len(head)]
        lines += [f"{r.weight:<52} {r.kind:<6} {'x'.join(map(str, r.shape)):<14} {r.rank:>4} {r.trainable:>9,} "
                  f"{r.lora_equivalent:>9,}" for r in s.ops]
        if s.skipped:
            lines.append("skipped:")
            lines += [f"  {r.weight:<50} {r.kind:<6} {r.reason}" for r in s.skipped]
        lines += [f"{len(s.ops)} ops adapted, {len(s.skipped)} skipped; base model: {s.base_params:,} parameters",
                  "", f"{'method':<6} {'rank':>5} {'trainable':>12} {'% of base':>10} {'frozen extra':>13}"]
        lines += [f"{c.method:<6} {c.rank:>5} {c.trainable:>12,} {100 * c.trainable / base:>9.4f}% {c.frozen:>13,}"
                  for c in self.costs]
        return "\n".join(lines)


def inspect_model(model: nn.Module, batch: Any, *, rank: int = 8, **select: Any) -> Inspection:
    """Capture and match `model` on `batch` (no gradients) and cost GiVA, LoRA and VeRA on its ops.

    `select` takes `adapt`'s op selection keywords (targets=, exclude=, kinds=, train=) as documented there.
    """
    adapted = adapt(model, batch, rank=rank, init="random", progress=False, **select)
    s = summary(adapted)
    vera_rank = VERA_RANK_FACTOR * rank
    ins = [op.in_features for op in adapted.found.ops]
    outs = [op.out_features for op in adapted.found.ops]
    costs = (
        MethodCost("GiVA", rank, s.adapter_params, s.lora_equivalent),
        MethodCost("LoRA", rank, s.lora_equivalent, 0),
        MethodCost("VeRA", vera_rank, sum(vera_rank + o for o in outs),
                   vera_rank * (max(ins, default=0) + max(outs, default=0))),
    )
    return Inspection(s, rank, costs)
