"""Checking an exported graph against PyTorch: synthetic sample images and the error raised
when the runs disagree (the comparison itself is :mod:`detkit.eval.compare`)."""

from __future__ import annotations

import torch
from torch import Tensor

from detkit.errors import UserError


class ExportCheckError(UserError):
    """ONNX Runtime and PyTorch disagree on the sample images beyond the tolerance."""


def sample_images(count: int, size: tuple[int, int], seed: int = 0) -> Tensor:
    """Deterministic synthetic test images ``[count, 3, h, w]`` in ``[0, 1]``: a smooth
    background with filled rectangles of random colours and pixel noise, each different."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.rand(count, 3, 4, 4, generator=gen)
    images = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    for image in images:
        for _ in range(int(torch.randint(2, 6, (1,), generator=gen))):
            y0, x0 = (int(torch.randint(0, max(1, s - 8), (1,), generator=gen)) for s in (h, w))
            y1 = y0 + int(torch.randint(4, max(5, h // 2), (1,), generator=gen))
            x1 = x0 + int(torch.randint(4, max(5, w // 2), (1,), generator=gen))
            image[:, y0:y1, x0:x1] = torch.rand(3, 1, 1, generator=gen)
    # Pixel noise: flat regions would give exactly tied scores at many locations, and ONNX
    # Runtime may break ties differently from PyTorch (which box of a tie survives NMS).
    images += (torch.rand(images.shape, generator=gen) - 0.5) * 0.1
    return images.clamp_(0, 1)
