"""Training data whose order and per-item randomness are functions of (seed, epoch, position), so that a run
resumed from a checkpoint reads exactly the batches the uninterrupted run would have read.

Two pieces:
- `EpochSampler` permutes the dataset with a generator seeded by (seed, epoch), takes this rank's share, and can
  start one epoch part-way (the batches a checkpoint says were already trained on are skipped, not re-read).
- `SeededItems` runs each item's loading under a torch RNG seeded by (seed, epoch, index), so random clip starts,
  random crops and random captions (drawn from torch's global RNG by the datasets) are the same on every run, in
  any worker, and leave the training process's own RNG (noise, dropout) untouched.

The sampler yields "draws" `epoch * len(dataset) + index` rather than bare indices: that is how the epoch reaches
`SeededItems` inside DataLoader workers, whose copy of the dataset never sees `set_epoch`.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's SeedSequence mixes them; no salted hash())."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class EpochSampler(Sampler[int]):
    """Draws of one rank for one epoch: a (seed, epoch) permutation, split round-robin over ranks.

    Every rank gets `ceil(n / world_size)` draws (the permutation wraps around to pad the last ranks, as torch's
    DistributedSampler does), so all ranks run the same number of steps. `resume_at(epoch, batches)` makes the next
    iteration of that epoch skip its first `batches` batches (`batch_size` draws each) for this rank.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        if num_items < 1:
            raise ValueError("the training dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.num_items, self.batch_size, self.seed, self.shuffle = int(num_items), int(batch_size), int(seed), shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        self._resume = (int(epoch), int(batches_done))

    def __len__(self) -> int:
        return -(-self.num_items // self.world_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's draws of `epoch`, before any resume skip."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        padded = order.repeat(-(-len(self) * self.world_size // self.num_items))[: len(self) * self.world_size]
        return padded[self.rank :: self.world_size] + epoch * self.num_items

    def __iter__(self) -> Iterator[int]:
        draws = self.epoch_order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            draws = draws[self._resume[1] * self.batch_size :]
            self._resume = None  # later epochs start from their beginning
        return iter(draws.tolist())


class SeededItems(Dataset):
    """`dataset` indexed by the draws of an EpochSampler; each item is loaded under torch's RNG seeded by
    (seed, epoch, index) and the caller's RNG state is restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, draw: int) -> Any:
        epoch, index = divmod(int(draw), len(self.dataset))
        with torch.random.fork_rng(devices=[]):  # CPU RNG only: datasets do not draw on the GPU
            torch.manual_seed(derived_seed(self.seed, epoch, index))
            return self.dataset[index]
