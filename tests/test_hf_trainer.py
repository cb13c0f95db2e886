"""An adapted HF model trains under transformers.Trainer, changing the adapter vectors only."""
from __future__ import annotations

import warnings

import torch
import transformers as tf
from torch.utils.data import Dataset

import giva_fx
from tests.models import bert


class Sentences(Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(3, 96, (10,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(i % 3)}


def test_trainer_updates_only_the_vectors(tmp_path):
    model, sample = bert()
    adapted = giva_fx.adapt(model, sample, rank=2, progress=False)
    frozen = {n: p.detach().clone() for n, p in adapted.named_parameters() if not p.requires_grad}
    vectors = {n: p.detach().clone() for n, p in giva_fx.trainable_parameters(adapted).items()}
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=1,
                                learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                remove_unused_columns=False, disable_tqdm=True)
    with warnings.catch_warnings():  # Trainer's extra `num_items_in_batch` input is not a misspelling
        warnings.simplefilter("error", giva_fx.GivaWarning)
        result = tf.Trainer(model=adapted, args=args, train_dataset=Sentences()).train()
    assert result.global_step == 4
    assert all(torch.equal(p, frozen[n]) for n, p in adapted.named_parameters() if n in frozen)
    changed = [n for n, p in giva_fx.trainable_parameters(adapted).items() if not torch.equal(p, vectors[n])]
    assert any(n.endswith("lambda_o") for n in changed)
