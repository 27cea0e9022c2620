"""The synthetic sample images an export is checked on."""

import torch

from detkit.export.verify import sample_images


def test_sample_images_differ_and_are_in_range():
    images = sample_images(3, (40, 50), seed=0)
    assert images.shape == (3, 3, 40, 50)
    assert images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images[0], images[1])
    assert torch.equal(images, sample_images(3, (40, 50), seed=0))
