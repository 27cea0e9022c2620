"""Faster R-CNN (Ren et al., 2015): backbone (optionally with FPN), Region Proposal Network
and Fast R-CNN RoI heads, trained jointly. Composition only; the parts live in
:mod:`detkit.models.heads.rpn`, :mod:`detkit.models.heads.roi_heads` and the backbones.

The same inference contract as the one-stage detectors
(:mod:`detkit.models.detectors.one_stage`): ``predict_padded`` is the one batched,
fixed-shape inference method (padded proposals from the RPN, class-specific boxes of the real
proposals from the RoI heads, one ``multiclass_nms``), ``forward`` unpads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.models.transform import Normalize, check_images, check_inputs
from detkit.structures import (
    DetectorOutput,
    Targets,
    pad_targets,
    target_sizes,
    unpad_detections,
)


class FasterRCNN(nn.Module):
    """Two-stage detector; ``forward(images, targets=None) -> DetectorOutput``.

    Losses: ``rpn_objectness``, ``rpn_box_regression``, ``classification``,
    ``box_regression``. Images are ``[B, 3, H, W]`` in ``[0, 1]``, already resized/padded by
    the data pipeline; proposals and detections are clipped to the tensor size, or to each
    target's ``size`` ``(h, w)`` when the targets carry one (``image_sizes`` in
    :meth:`predict_padded`).

    Args:
        backbone: returns a list of maps (all with the same channels).
        rpn: :class:`~detkit.models.heads.rpn.RegionProposalNetwork`.
        roi_heads: :class:`~detkit.models.heads.roi_heads.RoIHeads` over ``num_classes``.
        num_classes: object classes ``C`` (the box classifier adds background internally).
        image_size: the shorter side the ``rcnn`` transform resizes to (metadata for the data
            pipeline and export; the model never resizes).
        image_mean, image_std: normalisation of the ``[0, 1]`` input.
    """

    family = "faster_rcnn"

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module,
        num_classes: int,
        image_size: int | Sequence[int] = 600,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        predicted = getattr(roi_heads.box_predictor, "num_classes", num_classes)
        if predicted != int(num_classes):
            raise ValueError(
                f"roi_heads.box_predictor scores {predicted} object classes but num_classes="
                f"{num_classes} (background is added inside the predictor)"
            )
        self.num_classes = int(num_classes)
        self.image_size = image_size
        self.normalize = Normalize(image_mean, image_std)
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    def features(self, images: Tensor) -> list[Tensor]:
        features = self.backbone(self.normalize(images))
        return [features] if isinstance(features, Tensor) else list(features)

    # ----- the inference contract -------------------------------------------------------
    def predict_candidates(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Class-specific ``boxes [B, K, C, 4]`` and ``scores [B, K, C]`` of the padded
        proposals, before selection (what an export with ``nms=False`` ends in)."""
        check_images(images)
        shape, sizes = _shape_and_sizes(images, image_sizes)
        features = self.features(images)
        (proposals, num), _ = self.rpn(features, shape, sizes)
        return self.roi_heads.candidates(features, proposals, num, shape, sizes)

    def predict_padded(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections ``(boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B])``
        in input pixels, ``K = roi_heads.detections_per_image``. ``image_sizes [B, 2]``: each
        image's valid (h, w) inside the padded batch (default: the tensor size)."""
        return self.roi_heads.select(*self.predict_candidates(images, image_sizes))

    def nms_settings(self) -> dict:
        """The final selection's settings, as ``multiclass_nms`` takes them."""
        return self.roi_heads.nms_settings()

    def forward(
        self,
        images: Tensor,
        targets: Targets | None = None,
        return_detections: bool | None = None,
    ) -> DetectorOutput:
        """Losses when ``targets`` are given; detections in eval mode (or when asked)."""
        want = check_inputs(self, images, targets, return_detections)
        shape, sizes = _shape_and_sizes(images, target_sizes(targets))
        features = self.features(images)
        gt = None if targets is None else pad_targets(targets, device=images.device)
        (proposals, num), losses = self.rpn(features, shape, sizes, gt)
        if gt is not None:
            per_image = [p[:n] for p, n in zip(proposals, num.tolist(), strict=True)]
            losses.update(self.roi_heads.loss(features, per_image, shape, gt))
        output = DetectorOutput(losses=losses)
        if want:
            with torch.no_grad():
                candidates = self.roi_heads.candidates(features, proposals, num, shape, sizes)
                output.detections = unpad_detections(*self.roi_heads.select(*candidates))
        return output

    @classmethod
    def from_torchvision(cls, model: nn.Module) -> FasterRCNN:
        """A detkit Faster R-CNN with the configuration and weights of a torchvision
        ``fasterrcnn_resnet50_fpn`` / ``fasterrcnn_mobilenet_v3_large(_320)_fpn`` (same
        eval-mode detections on images its transform does not resize; labels shifted down
        by one since torchvision counts background as class 0)."""
        from detkit.models.convert import faster_rcnn_from_torchvision

        return faster_rcnn_from_torchvision(cls, model)


def _shape_and_sizes(images: Tensor, image_sizes: Tensor | None) -> tuple[tuple, Tensor]:
    """The padded ``(h, w)`` of the batch and each image's valid ``[B, 2]`` size in it."""
    shape = (int(images.shape[-2]), int(images.shape[-1]))
    if image_sizes is None:
        full = torch.tensor(shape, device=images.device)
        return shape, full.expand(images.shape[0], 2)
    limit = torch.tensor(shape, device=images.device)
    return shape, torch.minimum(image_sizes.to(images.device), limit)
