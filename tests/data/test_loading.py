"""collate and the DetectionDataModule loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from detkit.data import COCODetection, DetectionDataModule, collate
from detkit.data import transforms as T
from detkit.data.datamodule import seed_worker


def test_collate_pads_bottom_right_and_keeps_targets():
    a, b = torch.rand(3, 20, 30), torch.rand(3, 25, 10)
    ta, tb = {"boxes": torch.zeros(2, 4)}, {"boxes": torch.zeros(0, 4)}
    images, targets = collate([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 25, 30)
    assert torch.equal(images[0, :, :20, :30], a) and images[0, :, 20:].abs().sum() == 0
    assert torch.equal(images[1, :, :25, :10], b) and images[1, :, :, 10:].abs().sum() == 0
    assert targets == [ta, tb]
    images, _ = collate([(a, ta), (b, tb)], pad_to_multiple=32)
    assert images.shape == (2, 3, 32, 32)


def test_datamodule_loaders(coco_dir):
    image_dir, ann, _ = coco_dir
    train = COCODetection(image_dir, ann, transforms=T.ssd_train(64))
    val = COCODetection(image_dir, ann, transforms=T.eval_resize(64))
    dm = DetectionDataModule(train=train, val=val, batch_size=3, eval_batch_size=2)
    assert dm.val_dataset is val and dm.num_classes == 12
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 64, 64) and len(targets) == 3
    ids = [t["image_id"] for batch in dm.val_dataloader() for t in batch[1]]
    assert ids == [100, 101, 102, 103]  # no shuffling, all images
    assert not dm.val_dataloader().persistent_workers


def _boxes_per_step(dataset, worker_init_fn):
    loader = DataLoader(
        dataset,
        batch_size=1,
        sampler=[0] * 6,  # the same image six times: workers take steps alternately
        num_workers=2,
        collate_fn=collate,
        worker_init_fn=worker_init_fn,
    )
    return [targets[0]["boxes"] for _, targets in loader]


def test_workers_get_distinct_augmentation_streams(coco_dir):
    image_dir, ann, _ = coco_dir
    train = COCODetection(image_dir, ann, transforms=T.ssd_train(48))
    # forked workers share albumentations' generator state unless each is reseeded
    shared = _boxes_per_step(train, None)
    assert all(torch.equal(shared[k], shared[k + 1]) for k in (0, 2, 4))
    seeded = _boxes_per_step(train, seed_worker)
    assert not all(torch.equal(seeded[k], seeded[k + 1]) for k in (0, 2, 4))
    assert DetectionDataModule(train=train, num_workers=2).train_dataloader().worker_init_fn


def test_cache_images_decodes_each_file_once_and_hands_out_copies(coco_dir):
    image_dir, ann_file, _ = coco_dir
    cached = COCODetection(image_dir, ann_file, cache_images=True)
    plain = COCODetection(image_dir, ann_file)
    first = [cached.load_raw(i)[0] for i in range(len(cached))]
    for path in image_dir.iterdir():  # from now on only the cache can answer
        path.unlink()
    for i, image in enumerate(first):
        again, record = cached.load_raw(i)
        assert record is cached.records[i] and np.array_equal(again, image)
        again[:] = 0  # a transform writing in place must not change the cache
        assert np.array_equal(cached.load_raw(i)[0], image) and image.any()
        assert cached[i][0].shape == (3, record.height, record.width)
    with pytest.raises(FileNotFoundError, match="img0.png"):
        plain.load_raw(0)  # without the cache the file is read each time
