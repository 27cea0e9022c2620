"""Input normalisation inside the detectors (``detkit.models.transform``)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from detkit.models.transform import Normalize

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _layouts(images: torch.Tensor):
    yield "nchw", images
    yield "nhwc", images.contiguous(memory_format=torch.channels_last)
    yield "strided", images[..., ::2]


@pytest.mark.parametrize("shape", [(8, 3, 64, 64), (2, 3, 5, 7), (1, 3, 1, 1), (1, 3, 31, 300)])
def test_normalize_equals_torchvision_bit_for_bit_in_every_memory_layout(shape):
    torch.manual_seed(0)
    normalize = Normalize(MEAN, STD)
    for layout, images in _layouts(torch.rand(shape)):
        before = images.clone()
        expected = TF.normalize(images.contiguous(), list(MEAN), list(STD))
        out = normalize(images)
        assert torch.equal(out, expected), layout
        assert torch.equal(images, before), layout  # the caller's batch is not changed in place
        # NHWC in, NHWC out: the convolutions after it keep their layout
        if layout == "nhwc":
            assert out.is_contiguous(memory_format=torch.channels_last)


def test_normalize_passes_gradients_in_both_layouts_and_keeps_the_dtype():
    normalize = Normalize(MEAN, STD)
    for layout in (torch.contiguous_format, torch.channels_last):
        images = torch.rand(2, 3, 6, 6, requires_grad=True)
        normalize(images.contiguous(memory_format=layout)).sum().backward()
        expected = (1 / torch.tensor(STD)).view(1, 3, 1, 1).expand(2, 3, 6, 6)
        torch.testing.assert_close(images.grad, expected)
    double = torch.rand(1, 3, 4, 4, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    assert normalize(double).dtype == torch.float64
