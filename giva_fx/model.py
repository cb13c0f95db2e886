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


Signature = tuple[int, tuple[str, ...]]


class GivaModel(nn.Module):
    """The rewritten model. It returns what the original returned, trains in plain PyTorch (only
    the adapter vectors and `train=` parameters require grad) and honours train()/eval().

    A call with another set of inputs than the sample's (e.g. no `labels` at inference) captures
    the source model once more for that set and rewrites it with the *same* adapters, weights and
    buffers, so every variant computes the same function.
    """

    def __init__(self, graph_module: fx.GraphModule, found: MatchResult, config: Any,
                 report: AdaptReport, signature: Signature, full_train: tuple[str, ...] = (),
                 source: nn.Module | None = None) -> None:
        super().__init__()
        self.full_train = full_train
        self.graph_module = graph_module
        self.variants = nn.ModuleDict()
        self.found = found
        self.adapt_config = config
        self.report = report
        self.signature = signature
        object.__setattr__(self, "source", source)  # the user's model: not a submodule of ours

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_for(args, kwargs)(*args, **kwargs)

    def graph_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.GraphModule:
        """The graph that takes these inputs, captured on first use."""
        signature = (len(args), tuple(sorted(kwargs)))
        if signature == self.signature:
            return self.graph_module
        key = f"args{signature[0]}_" + "_".join(signature[1])
        if key not in self.variants:
            if self.source is None:
                n, keys = self.signature
                raise TypeError(f"the adapted model takes {n} positional input(s) and keywords {list(keys)}; "
                                f"got {len(args)} and {sorted(kwargs)}")
            from giva_fx.adapt import capture_variant  # adapt builds on this module

            self.variants[key] = capture_variant(self, args, kwargs)
            set_training(self.variants[key], self.training)
        return self.variants[key]

    def train(self, mode: bool = True) -> GivaModel:
        super().train(mode)
        for gm in (self.graph_module, *self.variants.values()):
            set_training(gm, mode)
        return self

    def adapters(self) -> dict[str, nn.Module]:
        """Weight name -> adapter, in graph order."""
        return dict(adapters_of(self.graph_module))
