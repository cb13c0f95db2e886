"""Small model factories shared by the tests: (model, sample batch) built offline from configs."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 96


class FunctionalMLP(nn.Module):
    """A plain module that calls F.linear on its own parameters (no nn.Linear anywhere)."""

    def __init__(self, d_in: int = 12, hidden: int = 24, classes: int = 5, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, d_in) / d_in**0.5)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)
        self.head = nn.Parameter(torch.randn(classes, hidden) / hidden**0.5)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, self.w1, self.b1))
        h = F.dropout(h, self.dropout, self.training)
        h = torch.tanh(h @ self.w2.T) + h
        return F.linear(h, self.head)


def _ids(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def functional_mlp(batch: int = 8, dropout: float = 0.0) -> tuple[nn.Module, Any]:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = FunctionalMLP(dropout=dropout)
    return model, (torch.randn(batch, 12, generator=gen), torch.randint(0, 5, (batch,), generator=gen))


def bert(batch: int = 4, seq: int = 10, dropout: float = 0.0, arch: str = "bert") -> tuple[nn.Module, Any]:
    import transformers as tf

    torch.manual_seed(0)
    config_cls, model_cls = {
        "bert": (tf.BertConfig, tf.BertForSequenceClassification),
        "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification),
    }[arch]
    config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    gen = torch.Generator().manual_seed(1)
    ids = _ids(batch, seq, gen).clamp_min(3)
    sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "labels": torch.randint(0, 3, (batch,), generator=gen)}
    return model_cls(config), sample


def gpt2(batch: int = 4, seq: int = 10, dropout: float = 0.0) -> tuple[nn.Module, Any]:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                           resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                           bos_token_id=0, eos_token_id=0)
    ids = _ids(batch, seq, torch.Generator().manual_seed(1))
    return tf.GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}


def llama(batch: int = 4, seq: int = 10, arch: str = "llama") -> tuple[nn.Module, Any]:
    import transformers as tf

    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ids = _ids(batch, seq, torch.Generator().manual_seed(1))
    return model_cls(config), {"input_ids": ids, "labels": ids}


def vit(batch: int = 4) -> tuple[nn.Module, Any]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              num_classes=5, embed_dim=48, depth=2, num_heads=3)
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, 5, (batch,), generator=gen))


CASES: dict[str, Callable[..., tuple[nn.Module, Any]]] = {
    "functional_mlp": functional_mlp,
    "bert": bert,
    "roberta": lambda **kw: bert(arch="roberta", **kw),
    "gpt2": gpt2,
    "llama": llama,
    "qwen2": lambda **kw: llama(arch="qwen2", **kw),
    "vit": vit,
}


def call(model: nn.Module, sample: Any) -> Any:
    """Run a model on a sample batch the way adapt() does."""
    if isinstance(sample, dict):
        return model(**sample)
    if isinstance(sample, tuple):
        return model(sample[0])
    return model(sample)


def logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def resized(sample: Any, batch: int, seq: int | None = None) -> Any:
    """A batch of another size and (for text) another sequence length, same structure."""
    gen = torch.Generator().manual_seed(7)
    if isinstance(sample, dict):
        s = seq or sample["input_ids"].shape[1]
        ids = torch.randint(3, VOCAB, (batch, s), generator=gen)
        out = {"input_ids": ids}
        if "attention_mask" in sample:
            out["attention_mask"] = torch.ones_like(ids)
        if "labels" in sample:
            out["labels"] = ids if sample["labels"].dim() == 2 else torch.randint(0, 3, (batch,), generator=gen)
        return out
    x, y = sample
    return torch.randn(batch, *x.shape[1:], generator=gen), torch.randint(0, 5, (batch,), generator=gen)
