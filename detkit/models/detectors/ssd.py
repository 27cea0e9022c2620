"""SSD (Liu et al., 2016): a backbone's feature maps, 3x3 predictors per map, default boxes,
MultiBox loss and per-class NMS. Composition only; the parts live in their own modules."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from detkit.models.detectors.one_stage import OneStageDetector


class SSD(OneStageDetector):
    """Single Shot MultiBox Detector: a :class:`OneStageDetector` of SSD's parts.

    Args:
        backbone: returns a list of feature maps (``out_channels`` as the head's
            ``in_channels``).
        head: :class:`~detkit.models.heads.ssd.SSDHead` over ``C + 1`` classes (background
            added inside the head, never leaks out).
        prior_generator: :class:`~detkit.matching.DefaultBoxGenerator`.
        box_coder: :class:`~detkit.matching.DeltaXYWHCoder` (SSD's variances are its weights).
        loss: :class:`~detkit.models.losses.MultiBoxLoss` (matcher + hard negative mining).
        num_classes, image_size, image_mean, image_std: see :class:`OneStageDetector`.
        score_threshold, nms_threshold, detections_per_image, topk_candidates_per_class:
            inference, torchvision's SSD rule (the best ``topk_candidates_per_class`` of each
            class above the threshold enter NMS).
        pretrained: ``None`` or ``"torchvision"`` (torchvision's COCO ssd300_vgg16 weights,
            downloaded; needs the VGG16 backbone).
    """

    family = "ssd"

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        prior_generator: object,
        box_coder: object,
        loss: nn.Module,
        num_classes: int,
        image_size: int | Sequence[int] = 300,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        detections_per_image: int = 200,
        topk_candidates_per_class: int | None = 400,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        pretrained: str | None = None,
    ) -> None:
        super().__init__(
            backbone,
            head,
            prior_generator,
            box_coder,
            loss,
            num_classes,
            image_size,
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            detections_per_image=detections_per_image,
            topk_candidates_per_class=topk_candidates_per_class,
            image_mean=image_mean,
            image_std=image_std,
        )
        anchors = list(prior_generator.num_anchors_per_location())
        if list(getattr(head, "num_anchors", anchors)) != anchors:
            raise ValueError(
                f"SSD: the head predicts {head.num_anchors} boxes per location but the prior "
                f"generator makes {anchors}"
            )
        channels = getattr(backbone, "out_channels", None)
        if channels is not None and list(getattr(head, "in_channels", channels)) != channels:
            raise ValueError(
                f"SSD: the head reads maps of {head.in_channels} channels but the backbone "
                f"gives {list(channels)}"
            )
        if pretrained is not None:
            from detkit.models.convert import load_ssd_torchvision_weights

            load_ssd_torchvision_weights(self, pretrained)

    @classmethod
    def from_torchvision(cls, model: nn.Module) -> SSD:
        """A detkit SSD with the weights of a torchvision ``ssd300_vgg16`` (same detections,
        labels shifted down by one since torchvision counts background as class 0)."""
        from detkit.models.convert import ssd_from_torchvision

        return ssd_from_torchvision(cls, model)


def ssd300_priors() -> object:
    """The paper's (and torchvision's) SSD300 default boxes: 8732 at 300x300."""
    from detkit.matching import DefaultBoxGenerator

    return DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )


def ssd(
    backbone: nn.Module,
    num_classes: int,
    image_size: int | Sequence[int] = 300,
    prior_generator: object | None = None,
    **kwargs,
) -> SSD:
    """An SSD of the paper's parts around ``backbone`` (its ``out_channels`` size the head):
    default boxes (SSD300's unless given), offsets with variances (0.1, 0.2), matching at 0.5
    and 3:1 hard negative mining. ``kwargs`` go to :class:`SSD`."""
    from detkit.matching import DeltaXYWHCoder, HardNegativeSampler, SSDMatcher
    from detkit.models.heads.ssd import SSDHead
    from detkit.models.losses import MultiBoxLoss

    priors = prior_generator if prior_generator is not None else ssd300_priors()
    head = SSDHead(backbone.out_channels, priors.num_anchors_per_location(), num_classes)
    loss = MultiBoxLoss(SSDMatcher(0.5), HardNegativeSampler(3))
    coder = DeltaXYWHCoder((10.0, 10.0, 5.0, 5.0))
    return SSD(backbone, head, priors, coder, loss, num_classes, image_size, **kwargs)
