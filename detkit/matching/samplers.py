"""Samplers choosing which matched priors a loss sees, batched over images.

Per-image selections of different sizes are done at once with per-row keys and one
``topk``: a row's first ``count`` entries of the ordered candidates are kept, the rest masked.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _pick_first(order_keys: Tensor, counts: Tensor, largest: bool) -> Tensor:
    """Mask ``[B, P]`` of the ``counts[b]`` entries of row b that come first by key."""
    batch, num = order_keys.shape
    mask = torch.zeros(batch, num, dtype=torch.bool, device=order_keys.device)
    k = int(min(num, math.ceil(float(counts.max())) if counts.numel() else 0))
    if k <= 0:
        return mask
    idx = order_keys.topk(k, dim=1, largest=largest, sorted=True).indices
    rank = torch.arange(k, device=order_keys.device)
    return mask.scatter_(1, idx, rank[None, :] < counts.view(batch, 1))


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [B, P], got {tuple(t.shape)}")


class BalancedPositiveNegativeSampler:
    """Random subset of at most ``batch_size_per_image`` priors per image, positives first.

    Same counts as torchvision's sampler: ``min(#pos, int(batch_size * positive_fraction))``
    positives, then ``min(#neg, batch_size - that)`` negatives, chosen uniformly at random.
    Input ``labels [B, P]`` int8 (1 positive, 0 negative, -1 ignore); returns
    ``(pos_mask, neg_mask)``, both ``[B, P]`` bool.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float) -> None:
        if batch_size_per_image < 0:
            raise ValueError(f"batch_size_per_image must be >= 0, got {batch_size_per_image}")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(
        self, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Sample positives and negatives from ``labels [B, P]``."""
        _check_2d("labels", labels)
        positive, negative = labels == 1, labels == 0
        max_pos = int(self.batch_size_per_image * self.positive_fraction)
        num_pos = positive.sum(1).clamp(max=max_pos)
        num_neg = torch.minimum(negative.sum(1), self.batch_size_per_image - num_pos)
        keys = torch.rand(labels.shape, generator=generator, device=labels.device)
        # Non-candidates get keys above every candidate's so they sort last.
        pos_mask = _pick_first(keys.masked_fill(~positive, 2.0), num_pos, largest=False)
        neg_mask = _pick_first(keys.masked_fill(~negative, 2.0), num_neg, largest=False)
        return pos_mask, neg_mask

    def __repr__(self) -> str:
        return (
            f"BalancedPositiveNegativeSampler(batch_size_per_image={self.batch_size_per_image},"
            f" positive_fraction={self.positive_fraction})"
        )


class HardNegativeSampler:
    """SSD hard-negative mining: per image the ``neg_pos_ratio * #positives`` worst negatives.

    Reproduces the selection in torchvision's ``SSD.compute_loss``: positives get loss -inf,
    priors are ranked by loss (descending) and the first ``ratio * #pos`` ranks are kept, so an
    image without positives gets no negatives. When that count exceeds the image's negatives,
    torchvision's ranks run into positives too; ``exclude_positives=True`` caps the count at
    the number of negatives instead. Equal losses are ranked in an unspecified order (as
    torchvision's unstable sort).
    """

    def __init__(self, neg_pos_ratio: float = 3, exclude_positives: bool = False) -> None:
        if neg_pos_ratio < 0:
            raise ValueError(f"neg_pos_ratio must be >= 0, got {neg_pos_ratio}")
        self.neg_pos_ratio = neg_pos_ratio
        self.exclude_positives = exclude_positives

    def __call__(self, conf_loss: Tensor, positive_mask: Tensor) -> Tensor:
        """Negative mask ``[B, P]`` from ``conf_loss [B, P]`` and ``positive_mask [B, P]``."""
        _check_2d("conf_loss", conf_loss)
        if positive_mask.shape != conf_loss.shape:
            raise ValueError(
                f"positive_mask shape {tuple(positive_mask.shape)} does not match conf_loss "
                f"{tuple(conf_loss.shape)}"
            )
        positive_mask = positive_mask.bool()
        num_neg = self.neg_pos_ratio * positive_mask.sum(1)
        if self.exclude_positives:
            num_neg = torch.minimum(num_neg, (~positive_mask).sum(1))
        ranked = conf_loss.detach().masked_fill(positive_mask, float("-inf"))
        return _pick_first(ranked, num_neg, largest=True)

    def __repr__(self) -> str:
        return f"HardNegativeSampler(neg_pos_ratio={self.neg_pos_ratio})"
