"""The train loader's batches follow from (seed, epoch) alone: not from the global random
generator, the number of workers, or what a worker loaded before; and it resumes mid-epoch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DistributedSampler

from detkit.data import COCODetection, DetectionDataModule
from detkit.data import transforms as T
from detkit.data.resumable import EpochSampler


def _module(coco_dir, num_workers=0, seed=0, recipe=None, **options) -> DetectionDataModule:
    image_dir, ann, _ = coco_dir
    # SSD's recipe: crops, zoom-out and colour changes drawn per sample
    train = COCODetection(image_dir, ann, transforms=recipe or T.ssd_train(48))
    return DetectionDataModule(
        train=train, batch_size=2, num_workers=num_workers, seed=seed, **options
    )


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    _set_sampler_epoch(loader, epoch)  # what Lightning calls before each epoch
    return [(images, [t["boxes"] for t in targets]) for images, targets in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(ba, bb, strict=True))
        for (ia, ba), (ib, bb) in zip(a, b, strict=True)
    )


def test_batches_do_not_depend_on_the_global_generator(coco_dir):
    torch.manual_seed(1)
    first = _epoch(_module(coco_dir).train_dataloader(), 0)
    torch.manual_seed(2)
    again = _epoch(_module(coco_dir).train_dataloader(), 0)
    assert _same(first, again)
    other_seed = _epoch(_module(coco_dir, seed=1).train_dataloader(), 0)
    assert not _same(first, other_seed)


def test_an_epoch_is_the_same_whatever_the_workers_and_what_they_loaded_before(coco_dir):
    # Persistent workers that already went through epoch 0 ...
    loader = _module(coco_dir, num_workers=2).train_dataloader()
    epoch_0 = _epoch(loader, 0)
    epoch_1 = _epoch(loader, 1)
    # ... give epoch 1 as the main process alone does, starting at epoch 1 (a resumed run).
    alone = _epoch(_module(coco_dir, num_workers=0).train_dataloader(), 1)
    assert _same(epoch_1, alone)
    assert not _same(epoch_0, epoch_1)


def test_a_new_loader_continues_an_epoch_where_the_saved_state_says(coco_dir):
    loader = _module(coco_dir, num_workers=2).train_dataloader()
    _epoch(loader, 0)
    _set_sampler_epoch(loader, 1)
    batches = iter(loader)
    next(batches)  # one batch of epoch 1 trained, then the checkpoint
    state = loader.state_dict()
    rest = [(images, [t["boxes"] for t in targets]) for images, targets in batches]
    assert state == {"seed": 0, "epoch": 1, "samples": 2}

    # (another seed in the new run's config: the run being resumed keeps its own)
    resumed = _module(coco_dir, num_workers=2, seed=7).train_dataloader()
    resumed.load_state_dict(state)
    assert len(resumed) == 2  # the epoch's length, as Lightning counts it
    assert _same(_epoch(resumed, 1), rest)
    assert len(_epoch(resumed, 2)) == 2  # the next epoch starts at its beginning


def test_processes_share_an_epoch_as_distributed_sampler_does():
    dataset = list(range(7))
    for shuffle in (False, True):
        shares = [
            EpochSampler(dataset, seed=3, shuffle=shuffle, num_replicas=3, rank=r).draws()
            for r in range(3)
        ]
        assert [len(s) for s in shares] == [3, 3, 3]
        drawn = [index for share in shares for index, _, _ in share]
        assert sorted(set(drawn)) == list(range(7))  # all of it, two repeated as padding
        seeds = [seed for share in shares for _, seed, _ in share]
        assert len(set(seeds)) == 9  # each draw its own augmentation seed
    # Without shuffling, the same indices per process as torch's sampler.
    for rank in range(3):
        ours = EpochSampler(dataset, shuffle=False, num_replicas=3, rank=rank).draws()
        theirs = DistributedSampler(dataset, num_replicas=3, rank=rank, shuffle=False)
        assert [index for index, _, _ in ours] == list(theirs)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_last_epochs_train_with_the_augmentation_closed(coco_dir, num_workers):
    """close_augmentation_epochs=1 of 3: epochs 0 and 1 as without it, epoch 2 as the recipe
    without zoom-out and crop; persistent workers started in epoch 0 follow too."""
    closing = _module(coco_dir, num_workers, close_augmentation_epochs=1)
    closing.trainer = SimpleNamespace(max_epochs=3, world_size=1, global_rank=0)
    loader = closing.train_dataloader()
    epochs = [_epoch(loader, epoch) for epoch in range(3)]
    full = _module(coco_dir).train_dataloader()
    plain = _module(coco_dir, recipe=T.ssd_train(48, zoom_out_p=0.0, crop_p=0.0))
    assert _same(epochs[0], _epoch(full, 0)) and _same(epochs[1], _epoch(full, 1))
    assert _same(epochs[2], _epoch(plain.train_dataloader(), 2))
    assert not _same(epochs[2], _epoch(full, 2))
    # A run resumed in a closed epoch (a new loader, which never saw epochs 0 and 1) too.
    resumed = _module(coco_dir, num_workers, close_augmentation_epochs=1)
    resumed.trainer = closing.trainer
    assert _same(_epoch(resumed.train_dataloader(), 2), epochs[2])


def test_closing_needs_max_epochs_and_a_dataset_that_can_close(coco_dir):
    closing = _module(coco_dir, close_augmentation_epochs=2)
    closing.trainer = SimpleNamespace(max_epochs=-1, world_size=1, global_rank=0)
    with pytest.raises(ValueError, match="trainer.max_epochs=-1"):
        closing.train_dataloader()
    listed = DetectionDataModule(train=[(torch.zeros(3, 8, 8), {})], close_augmentation_epochs=1)
    listed.trainer = SimpleNamespace(max_epochs=3, world_size=1, global_rank=0)
    with pytest.raises(ValueError, match="has no close_augmentation"):
        listed.train_dataloader()
    with pytest.raises(ValueError, match="close_augmentation_epochs must be >= 0"):
        DetectionDataModule(close_augmentation_epochs=-1)
