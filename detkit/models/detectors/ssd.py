"""SSD (Liu et al., 2016): a backbone's feature maps, 3x3 predictors per map, default boxes,
MultiBox loss and per-class NMS. Composition only; the parts live in their own modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.matching import DefaultBoxGenerator, DeltaXYWHCoder, HardNegativeSampler, SSDMatcher
from detkit.models.heads.ssd import SSDHead
from detkit.models.losses import MultiBoxLoss
from detkit.models.postprocess import ssd_postprocess_padded
from detkit.models.transform import Normalize, check_images, check_inputs
from detkit.structures import DetectorOutput, Targets, pad_targets, unpad_detections


class SSD(nn.Module):
    """Single Shot MultiBox Detector.

    Args:
        backbone: returns a list of feature maps and exposes ``out_channels: list[int]``.
        num_classes: object classes ``C`` (background is added internally and never leaks out).
        image_size: the (square or ``(h, w)``) size the data transforms resize to; the model
            itself never resizes and works at any size the backbone accepts.
        prior_generator: default boxes, ``(image_size, feature_map_sizes) -> [P, 4]`` pixels.
        matcher, box_coder, negative_sampler: parts of the loss (see :class:`MultiBoxLoss`).
        score_threshold, nms_threshold, detections_per_image, topk_candidates: inference.
        image_mean, image_std: normalisation applied to the ``[0, 1]`` input images.
        head: defaults to :class:`SSDHead` built from the backbone and the prior generator.
        pretrained: ``None`` or ``"torchvision"`` (torchvision's COCO ssd300_vgg16 weights,
            downloaded; needs the VGG16 backbone).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        image_size: int | Sequence[int] = 300,
        prior_generator: object | None = None,
        matcher: object | None = None,
        box_coder: object | None = None,
        negative_sampler: object | None = None,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        detections_per_image: int = 200,
        topk_candidates: int = 400,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        head: nn.Module | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()

        self.num_classes = int(num_classes)
        self.image_size = _as_hw(image_size)
        self.normalize = Normalize(image_mean, image_std)
        self.backbone = backbone
        self.prior_generator = prior_generator if prior_generator is not None else ssd300_priors()
        self.box_coder = box_coder if box_coder is not None else DeltaXYWHCoder((10, 10, 5, 5))
        self.loss = MultiBoxLoss(
            matcher if matcher is not None else SSDMatcher(0.5),
            self.box_coder,
            negative_sampler if negative_sampler is not None else HardNegativeSampler(3),
        )
        num_anchors = list(self.prior_generator.num_anchors_per_location())
        if head is None:
            channels = list(getattr(backbone, "out_channels", []))
            if len(channels) != len(num_anchors):
                raise ValueError(
                    f"backbone.out_channels has {len(channels)} maps but prior_generator "
                    f"describes {len(num_anchors)} (num_anchors_per_location={num_anchors})"
                )
            head = SSDHead(channels, num_anchors, self.num_classes)
        self.head = head
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = int(detections_per_image)
        self.topk_candidates = int(topk_candidates)
        self._priors: dict[tuple, Tensor] = {}
        if pretrained is not None:
            from detkit.models.torchvision_convert import load_torchvision_ssd_weights

            load_torchvision_ssd_weights(self, pretrained)

    def priors(self, image_size: tuple[int, int], features: Sequence[Tensor]) -> Tensor:
        """Default boxes ``[P, 4]`` (xyxy pixels) for these map sizes, cached by size."""
        sizes = tuple(tuple(f.shape[-2:]) for f in features)
        key = (tuple(image_size), sizes, features[0].device)
        if key not in self._priors:
            boxes = self.prior_generator(tuple(image_size), [list(s) for s in sizes])
            self._priors[key] = boxes.to(device=features[0].device, dtype=torch.float32)
        return self._priors[key]

    def forward(
        self,
        images: Tensor,
        targets: Targets | None = None,
        return_detections: bool | None = None,
    ) -> DetectorOutput:
        """Losses when ``targets`` are given; detections in eval mode (or when asked)."""
        want_detections = check_inputs(self, images, targets, return_detections)
        features = self.backbone(self.normalize(images))
        cls_logits, box_deltas = self.head(features)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        priors = self.priors(image_size, features)
        if priors.shape[0] != cls_logits.shape[1]:
            raise ValueError(
                f"prior_generator made {priors.shape[0]} default boxes but the head predicts "
                f"{cls_logits.shape[1]}: the generator's config does not match the feature maps"
            )
        output = DetectorOutput()
        if targets is not None:
            gt = pad_targets(targets, device=images.device)
            output.losses = self.loss(cls_logits, box_deltas, priors, gt)
        if want_detections:
            padded = self._postprocess(cls_logits.detach(), box_deltas.detach(), priors, image_size)
            output.detections = unpad_detections(*padded)
        return output

    def forward_padded(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inference only, fixed shapes for export: ``(boxes [B, K, 4], scores [B, K],
        labels [B, K], num_detections [B])`` with ``K = detections_per_image``."""
        check_images(images)
        features = self.backbone(self.normalize(images))
        cls_logits, box_deltas = self.head(features)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        return self._postprocess(
            cls_logits, box_deltas, self.priors(image_size, features), image_size
        )

    def _postprocess(self, cls_logits, box_deltas, priors, image_size):
        return ssd_postprocess_padded(
            cls_logits,
            box_deltas,
            priors,
            self.box_coder,
            image_size,
            self.score_threshold,
            self.nms_threshold,
            self.detections_per_image,
            self.topk_candidates,
        )

    @classmethod
    def from_torchvision(cls, model: nn.Module) -> SSD:
        """A detkit SSD with the weights of a torchvision ``ssd300_vgg16`` (same detections,
        labels shifted down by one since torchvision counts background as class 0)."""
        from detkit.models.torchvision_convert import ssd_from_torchvision

        return ssd_from_torchvision(cls, model)


def ssd300_priors() -> object:
    """The paper's (and torchvision's) SSD300 default boxes: 8732 at 300x300."""

    return DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    hw = tuple(int(s) for s in size)
    if len(hw) != 2:
        raise ValueError(f"image_size must be an int or (h, w), got {size}")
    return hw  # type: ignore[return-value]
