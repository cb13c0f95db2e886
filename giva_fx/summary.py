"""`summary()`: what was adapted, what was skipped and why, and what it costs in parameters."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from giva_fx.model import GivaModel
from giva_fx.trainable import full_parameters


@dataclass(frozen=True)
class OpRow:
    weight: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    init: str
    trainable: int
    lora_equivalent: int  # r * (in + out): a LoRA adapter of the same rank on the same op


@dataclass(frozen=True)
class SkipRow:
    weight: str
    kind: str
    reason: str


@dataclass(frozen=True)
class Summary:
    ops: tuple[OpRow, ...]
    skipped: tuple[SkipRow, ...]
    adapter_params: int
    full_params: int
    lora_equivalent: int
    base_params: int

    @property
    def trainable(self) -> int:
        return self.adapter_params + self.full_params

    def as_dict(self) -> dict:
        return {**asdict(self), "trainable": self.trainable}

    def __str__(self) -> str:
        head = f"{'weight':<52} {'kind':<6} {'shape':<16} {'rank':>4} {'init':<8} {'trainable':>9}"
        lines = [head, "-" * len(head)]
        for r in self.ops:
            lines.append(f"{r.weight:<52} {r.kind:<6} {'x'.join(map(str, r.shape)):<16} {r.rank:>4} "
                         f"{r.init:<8} {r.trainable:>9,}")
        if self.skipped:
            lines.append("skipped:")
            lines += [f"  {s.weight:<50} {s.kind:<6} {s.reason}" for s in self.skipped]
        lines.append(
            f"adapted ops: {len(self.ops)}  trainable: {self.trainable:,} "
            f"({self.adapter_params:,} adapter + {self.full_params:,} full)  "
            f"LoRA at the same ranks: {self.lora_equivalent:,}  base model: {self.base_params:,} "
            f"({100 * self.trainable / max(self.base_params, 1):.4f}% trainable)"
        )
        return "\n".join(lines)


def summary(adapted: GivaModel) -> Summary:
    """The adapted ops, the skipped ones with reasons, and parameter totals."""
    adapters = adapted.adapters()
    ops = tuple(
        OpRow(op.weight_name, op.kind, op.weight_shape, a.rank, a.init,
              a.lambda_s.numel() + a.lambda_o.numel(), a.rank * (op.in_features + op.out_features))
        for op in adapted.found.ops for a in [adapters[op.weight_name]]
    )
    skipped = tuple(SkipRow(s.weight_name or "?", s.kind, s.reason) for s in adapted.found.skipped)
    base = sum(p.numel() for n, p in adapted.graph_module.named_parameters() if not n.startswith("giva_adapters."))
    full = sum(p.numel() for p in full_parameters(adapted).values())
    return Summary(ops, skipped, sum(r.trainable for r in ops), full, sum(r.lora_equivalent for r in ops), base)
