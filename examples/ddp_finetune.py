"""Adapt and fine-tune with GiVA under DistributedDataParallel, on CPU (gloo), on real offline data.

    torchrun --nproc_per_node=2 examples/ddp_finetune.py      # two processes
    python examples/ddp_finetune.py                           # one process, same script

The task is scikit-learn's bundled digits: a small MLP is pretrained on upright digits (rank 0
trains it, every rank receives its weights), then fine-tuned on the same digits turned by 90
degrees. Each rank profiles gradients on its own shard: `adapt()` averages them across ranks, so
every rank computes the same bases from the global batch. DDP then synchronises only the adapter
vectors (lambda_s, lambda_o). The loss is printed by rank 0.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import giva_fx

SEED = 0
BATCH = 64  # per rank
PROFILE_BATCHES = 4  # per rank
EPOCHS = 8


def digits(quarter_turns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test images (N, 64) in [0, 1] and labels, turned by `quarter_turns` x 90 degrees."""
    data = load_digits()
    images = torch.rot90(torch.tensor(data.images, dtype=torch.float32) / 16, quarter_turns, dims=(1, 2))
    x_train, x_test, y_train, y_test = train_test_split(
        images.reshape(len(images), -1), torch.tensor(data.target), test_size=0.2, random_state=SEED,
        stratify=data.target)
    return x_train, y_train, x_test, y_test


def pretrained_base(rank: int) -> nn.Module:
    """The base model: trained on upright digits by rank 0, then the same weights on every rank."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if rank == 0:
        x, y, _, _ = digits(0)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(15):
            for i in torch.randperm(len(x)).split(BATCH):
                F.cross_entropy(model(x[i]), y[i]).backward()
                opt.step()
                opt.zero_grad()
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    say = print if rank == 0 else (lambda *a, **k: None)

    base = pretrained_base(rank)
    x, y, x_test, y_test = digits(1)
    mine = torch.arange(rank, len(x), world)  # this rank's shard of the training set
    say(f"{world} process(es); base model on turned digits: test accuracy {accuracy(base, x_test, y_test):.3f}")

    start = time.perf_counter()
    profile = [(x[i], y[i]) for i in mine[:PROFILE_BATCHES * BATCH].split(BATCH)]
    adapted = giva_fx.adapt(base, profile, rank=16, train=["4.*"], progress=False)  # 4: the head
    say(f"adapt(): {time.perf_counter() - start:.2f} s, {len(adapted.adapters())} adapters, "
        f"{sum(p.numel() for p in giva_fx.trainable_parameters(adapted).values())} trainable parameters")

    model = DistributedDataParallel(adapted) if distributed else adapted
    opt = torch.optim.AdamW(giva_fx.trainable_parameters(adapted).values(), lr=2e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)  # the same shuffle on every rank, then sharded
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        steps = len(order) // (BATCH * world)
        total = torch.zeros(1)
        for step in range(steps):
            i = order[(step * world + rank) * BATCH:(step * world + rank + 1) * BATCH]
            loss = F.cross_entropy(model(x[i]), y[i])
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += loss.detach()
        if distributed:
            dist.all_reduce(total)
        say(f"epoch {epoch + 1}: train loss {total.item() / (steps * world):.4f}")
    say(f"fine-tuned: test accuracy {accuracy(adapted, x_test, y_test):.3f}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
