"""Batching images of different sizes with different numbers of boxes."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def collate(
    batch: list[tuple[Tensor, dict[str, Any]]], pad_to_multiple: int = 1
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Stack ``(image, target)`` pairs: images zero-padded at the bottom/right to the largest
    height and width in the batch (rounded up to ``pad_to_multiple``), targets kept as a list.

    Padding at the bottom/right leaves box coordinates valid; each target's ``size`` still
    records the unpadded image size.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    step = max(int(pad_to_multiple), 1)
    height = max(img.shape[-2] for img in images)
    width = max(img.shape[-1] for img in images)
    height, width = -(-height // step) * step, -(-width // step) * step
    out = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for slot, img in zip(out, images, strict=True):
        slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
    return out, targets
