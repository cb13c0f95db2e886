"""Match: which weight ops exist, which are adapted, and why the rest are not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from giva_fx.batches import as_batch
from giva_fx.capture import capture
from giva_fx.passes.match import match
from tests.models import gpt2


class Layouts(nn.Module):
    """Every way a weight meets its input: F.linear, x @ W.T, x @ W, W @ x, a reused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.w_t = nn.Parameter(torch.randn(6, 6))  # used as x @ w_t.T: stored (out, in)
        self.w_io = nn.Parameter(torch.randn(6, 8))  # used as x @ w_io: stored (in, out)
        self.left = nn.Parameter(torch.randn(8, 8))  # used as left @ x^T: not adaptable
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(torch.relu(self.lin(x)))
        h = h @ self.w_t.T
        h = h @ self.w_io
        h = (self.left @ h.T).T
        return self.head(h)


def _match(model, sample, **kw):
    captured = capture(model, as_batch(sample))
    return match(captured.graph_module, aliases=captured.aliases, **kw)


def test_layouts_are_recorded_and_a_reused_layer_is_one_op_with_two_nodes():
    found = _match(Layouts(), torch.randn(4, 6))
    ops = {op.weight_name: op for op in found.ops}
    assert ops.keys() == {"lin.weight", "w_t", "w_io"}
    assert len(ops["lin.weight"].nodes) == 2
    assert (ops["w_t"].layout, ops["w_t"].out_features, ops["w_t"].in_features) == ("out_in", 6, 6)
    assert (ops["w_io"].layout, ops["w_io"].out_features, ops["w_io"].in_features) == ("in_out", 8, 6)
    reasons = {s.weight_name: s.reason for s in found.skipped}
    assert "left operand" in reasons["left"]
    assert "model's output" in reasons["head.weight"]


def test_gpt2_conv1d_is_addmm_with_a_transposed_weight_and_the_tied_head_is_skipped():
    model, sample = gpt2()
    found = _match(model, sample)
    attn = next(op for op in found.ops if op.weight_name == "transformer.h.0.attn.c_attn.weight")
    assert attn.layout == "in_out" and (attn.out_features, attn.in_features) == (96, 32)
    assert len(found.ops) == 8
    reasons = {s.weight_name: s.reason for s in found.skipped}
    assert "tied to transformer.wte.weight" in reasons["lm_head.weight"]


def test_targets_exclude_and_kinds_select_by_glob():
    model, sample = gpt2()
    found = _match(model, sample, targets=["*.attn.*"], exclude=["*.h.1.*"])
    assert [op.weight_name for op in found.ops] == ["transformer.h.0.attn.c_attn.weight",
                                                    "transformer.h.0.attn.c_proj.weight"]
    assert _match(model, sample, kinds=("conv",)).ops == ()
    # a named head is adapted even though it is tied and produces the output
    named = _match(model, sample, targets=["lm_head.weight"])
    assert [op.weight_name for op in named.ops] == ["lm_head.weight"]


def test_train_patterns_are_not_adapted():
    found = _match(Layouts(), torch.randn(4, 6), train=["lin.*"])
    reasons = {s.weight_name: s.reason for s in found.skipped}
    assert "trained fully" in reasons["lin.weight"]


def test_a_reused_layer_adapter_gets_the_sum_of_both_uses_gradient():
    import giva_fx

    model = Layouts()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    adapted = giva_fx.adapt(model, (x, y), rank=2, targets=["lin.weight"], progress=False)
    model.eval()
    grad = torch.autograd.grad(F.cross_entropy(model(x), y), model.lin.weight)[0]
    _, _, vh = torch.linalg.svd(grad)
    cos = torch.linalg.svdvals(adapted.adapters()["lin.weight"].A @ vh[:2].T)
    torch.testing.assert_close(cos, torch.ones(2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("pattern", ["*.weight", "lin.*"])
def test_exclude_everything_leaves_nothing_to_adapt(pattern):
    found = _match(Layouts(), torch.randn(4, 6), exclude=[pattern, "w_*"])
    assert found.ops == ()
