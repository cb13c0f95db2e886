"""Recompute: profiling's copy of the graph keeps only block inputs for the backward, and changes
no gradient."""
from __future__ import annotations

import pytest
import timm
import torch
import transformers as tf

from giva_fx.batches import as_batches
from giva_fx.capture import capture
from giva_fx.loss import batch_loss
from giva_fx.passes.match import match
from giva_fx.passes.mode import set_training
from giva_fx.passes.recompute import Recomputed, _blocks, recomputed
from tests.models import CASES, VOCAB, bert


def _prepared(model, sample):
    batch = as_batches(sample)[0]
    captured = capture(model, batch)
    gm = captured.graph_module
    names = [op.weight_name for op in match(gm, aliases=captured.aliases).ops]
    set_training(gm, False)
    return gm, batch, names


def _gradients(gm, batch, names) -> dict[str, torch.Tensor]:
    params = [gm.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    try:
        loss = batch_loss(gm(*batch.args, **batch.kwargs), batch, None)
        return dict(zip(names, torch.autograd.grad(loss, params)))
    finally:
        for p in params:
            p.requires_grad_(False)


def _saved_bytes(gm, batch, names) -> int:
    """Bytes of activations autograd keeps for the backward after the forward (weights and buffers,
    which live anyway, not counted): what checkpointing hides is not seen by these outer hooks."""
    state = {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers()]}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in state:
            total[0] += t.numel() * t.element_size()
        return t

    for n in names:
        gm.get_parameter(n).requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            batch_loss(gm(*batch.args, **batch.kwargs), batch, None)
    finally:
        for n in names:
            gm.get_parameter(n).requires_grad_(False)
    return total[0]


def _resnet():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 4, (2,), generator=gen))


@pytest.mark.parametrize("case", ["bert", "gpt2", "llama", "vit", "resnet"])
def test_gradients_through_the_recomputed_graph_equal_the_plain_graphs(case):
    gm, batch, names = _prepared(*(_resnet() if case == "resnet" else CASES[case]()))
    runner = recomputed(gm, names)
    assert any(isinstance(m, Recomputed) for m in runner.modules()), "no block was found to recompute"
    expected, got = _gradients(gm, batch, names), _gradients(runner, batch, names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_forward_keeps_a_fraction_of_the_activations():
    _, sample = bert(batch=8, seq=32)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                           intermediate_size=128, num_labels=3, max_position_embeddings=64,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    gm, batch, names = _prepared(tf.BertForSequenceClassification(config), sample)
    plain, kept = _saved_bytes(gm, batch, names), _saved_bytes(recomputed(gm, names), batch, names)
    # six blocks each keep their inputs instead of all their activations
    assert kept < 0.25 * plain, (kept, plain)


def test_the_captured_graph_and_its_weights_are_shared_not_changed():
    gm, batch, names = _prepared(*CASES["bert"]())
    before = gm.code
    runner = recomputed(gm, names)
    assert gm.code == before
    assert all(runner.get_parameter(n) is gm.get_parameter(n) for n in names)
    with torch.no_grad():
        torch.testing.assert_close(runner(*batch.args, **batch.kwargs).logits,
                                   gm(*batch.args, **batch.kwargs).logits, rtol=0, atol=0)


def test_a_block_is_a_numbered_module_holding_two_profiled_weights():
    names = ["enc.layer.0.q.weight", "enc.layer.0.k.weight", "enc.layer.1.q.weight",
             "stages.0.blocks.0.fc1.weight", "stages.0.blocks.0.fc2.weight", "stages.0.down.weight",
             "head.weight"]
    assert _blocks(names) == {"enc.layer.0", "stages.0", "stages.0.blocks.0"}


def test_a_model_without_repeated_blocks_runs_as_it_is():
    gm, batch, names = _prepared(*CASES["functional_mlp"]())
    runner = recomputed(gm, names)
    assert not any(isinstance(m, Recomputed) for m in runner.modules())
    assert runner.code == gm.code
