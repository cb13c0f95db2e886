"""`GivaModel`: the adapted graph, callable like the original model, with what adapt() found."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from giva_fx.passes.match import MatchResult
from giva_fx.passes.mode import set_training
from giva_fx.passes.rewrite import adapters_of


@dataclass(frozen=True)
class AdaptReport:
    """Where adapt() spent its time (seconds) and the losses it profiled."""

    capture_s: float = 0.0
    profile_s: float = 0.0
    bases_s: float = 0.0
    rewrite_s: float = 0.0
    losses: tuple[float, ...] = field(default_factory=tuple)

    @property
    def total_s(self) -> float:
        return self.capture_s + self.profile_s + self.bases_s + self.rewrite_s


class GivaModel(nn.Module):
    """The rewritten model. It returns what the original returned, trains in plain PyTorch (only
    the adapter vectors and `train=` parameters require grad) and honours train()/eval()."""

    def __init__(self, graph_module: fx.GraphModule, found: MatchResult, config: Any,
                 report: AdaptReport, signature: tuple[int, tuple[str, ...]],
                 full_train: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.full_train = full_train
        self.graph_module = graph_module
        self.found = found
        self.config = config
        self.report = report
        self.signature = signature

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if (len(args), tuple(sorted(kwargs))) != self.signature:
            n, keys = self.signature
            raise TypeError(
                f"the adapted model was captured with {n} positional input(s) and keywords "
                f"{list(keys)}; call it the same way (got {len(args)} and {sorted(kwargs)})"
            )
        return self.graph_module(*args, **kwargs)

    def train(self, mode: bool = True) -> GivaModel:
        super().train(mode)
        set_training(self.graph_module, mode)
        return self

    def adapters(self) -> dict[str, nn.Module]:
        """Weight name -> adapter, in graph order."""
        return dict(adapters_of(self.graph_module))
