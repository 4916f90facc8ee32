"""The resumable training order (datamodules/resumable.py): epochs are seeded permutations split over ranks, a
resume skips exactly the batches already trained on, and items are the same whatever the RNG state or workers."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.resumable import EpochSampler, SeededItems


class RandomItems(Dataset):
    """Items that draw from torch's global RNG, as random clip starts and random crops do."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "noise": torch.rand(3)}


def test_an_epoch_is_a_seeded_permutation_and_epochs_differ():
    sampler = EpochSampler(10, batch_size=2, seed=7)
    first = list(sampler)
    assert sorted(d % 10 for d in first) == list(range(10)) and all(d // 10 == 0 for d in first)
    assert list(EpochSampler(10, batch_size=2, seed=7)) == first
    assert list(EpochSampler(10, batch_size=2, seed=8)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert all(d // 10 == 1 for d in second) and [d % 10 for d in second] != [d % 10 for d in first]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_each_epoch_without_overlap(world_size):
    shares = [list(EpochSampler(10, 2, seed=1, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(share) for share in shares}) == 1  # every rank takes the same number of steps
    everything = [d for share in shares for d in share]
    assert set(everything) == set(range(10))  # all items; with 3 ranks two are drawn twice to even the shares
    assert len(everything) == len(shares[0]) * world_size < 10 + world_size


def test_resume_skips_the_trained_batches_of_that_epoch_only():
    whole = EpochSampler(10, batch_size=3, seed=0)
    whole.set_epoch(2)
    expected = list(whole)
    resumed = EpochSampler(10, batch_size=3, seed=0)
    resumed.set_epoch(2)
    resumed.resume_at(2, batches_done=2)
    assert list(resumed) == expected[6:]
    assert list(resumed) == expected  # the skip applies once
    later = EpochSampler(10, batch_size=3, seed=0)
    later.resume_at(1, 2)
    later.set_epoch(2)
    assert list(later) == expected  # a resume point of another epoch is not this epoch's


@pytest.mark.parametrize("num_workers", [0, 2])
def test_items_depend_on_the_draw_only(num_workers):
    def batches(rng_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(rng_seed)  # the training process's RNG, in whatever state it happens to be
        sampler = EpochSampler(10, batch_size=4, seed=3)
        loader = DataLoader(SeededItems(RandomItems(), seed=3), batch_size=4, sampler=sampler,
                            num_workers=num_workers, generator=torch.Generator().manual_seed(0))
        return [batch["noise"] for batch in loader]

    reference = [torch.stack([SeededItems(RandomItems(), 3)[d]["noise"] for d in chunk])
                 for chunk in torch.tensor(list(EpochSampler(10, 4, seed=3))).split(4)]
    for got, want in zip(batches(0), reference):
        assert torch.equal(got, want)
    for got, want in zip(batches(123), reference):
        assert torch.equal(got, want)


def test_loading_an_item_leaves_the_callers_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    SeededItems(RandomItems(), seed=0)[4]
    assert torch.equal(torch.rand(2), expected)
