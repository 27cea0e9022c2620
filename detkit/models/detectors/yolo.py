"""YOLO detectors: backbone -> (neck) -> head -> loss / decode + multiclass NMS.

Composition only. The version lives in the parts: :class:`~detkit.models.heads.yolo.YOLOv1Head`
with :class:`~detkit.matching.YOLOv1Grid`, :class:`~detkit.matching.YOLOv1Coder` and
:class:`~detkit.models.yolo_losses.YOLOv1Loss` is the YOLOv1 of the paper (S x S grid, K
boxes and one class distribution per cell); a feature-pyramid neck with
:class:`~detkit.models.heads.yolo.YOLOv3Head`, :class:`~detkit.matching.YOLOPriors`,
:class:`~detkit.matching.YOLOv3Coder` and :class:`~detkit.models.yolo_losses.YOLOv3Loss` is the
YOLOv3-style multi-scale anchor detector; the PANet neck (``bottom_up=True``) with the decoupled
:class:`~detkit.models.heads.yolo.YOLOv8Head`, :class:`~detkit.matching.AnchorPoints`,
:class:`~detkit.matching.DistanceCoder` and :class:`~detkit.models.yolo_losses.YOLOv8Loss`
(task-aligned assignment, CIoU and distribution focal loss) is the anchor-free YOLOv8 / YOLO11
design. :func:`yolov1`, :func:`yolov3` and :func:`yolov8` build them.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from detkit.models.detectors.one_stage import OneStageDetector


class YOLO(OneStageDetector):
    """A one-stage grid detector (YOLOv1, YOLOv3 or anchor-free YOLOv8 style, chosen by its
    parts).

    Args:
        backbone, neck, head, prior_generator, box_coder, loss, num_classes, image_size,
            image_mean, image_std: see :class:`OneStageDetector` (YOLO needs no background
            class).
        score_threshold, nms_threshold, detections_per_image, topk_candidates_per_image:
            inference (class-specific confidences above the threshold, the best
            ``topk_candidates_per_image`` over all classes enter per-class NMS).
    """

    family = "yolo"

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        prior_generator: object,
        box_coder: object,
        loss: nn.Module,
        num_classes: int,
        image_size: int | Sequence[int] = 416,
        neck: nn.Module | None = None,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        detections_per_image: int = 100,
        topk_candidates_per_image: int | None = 1000,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__(
            backbone,
            head,
            prior_generator,
            box_coder,
            loss,
            num_classes,
            image_size,
            neck=neck,
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            detections_per_image=detections_per_image,
            topk_candidates_per_image=topk_candidates_per_image,
            image_mean=image_mean,
            image_std=image_std,
        )


def yolov3(
    num_classes: int,
    image_size: int = 416,
    backbone: nn.Module | None = None,
    priors: object | None = None,
    box_loss: str = "ciou",
    ignore_threshold: float = 0.5,
    **kwargs,
) -> YOLO:
    """YOLOv3-style detector: CSP-Darknet (light default), top-down pyramid, 3x3 anchors."""
    from detkit.matching import YOLOPriors, YOLOv3Coder
    from detkit.models.backbones.darknet import CSPDarknet
    from detkit.models.heads.yolo import YOLOv3Head
    from detkit.models.necks.yolo_pan import YOLOPAN
    from detkit.models.yolo_losses import YOLOv3Loss

    backbone = backbone if backbone is not None else CSPDarknet()
    priors = priors if priors is not None else YOLOPriors()
    neck = YOLOPAN(backbone.out_channels)
    head = YOLOv3Head(neck.out_channels, priors.num_anchors_per_location(), num_classes)
    loss = YOLOv3Loss(box_loss, ignore_threshold)
    return YOLO(backbone, head, priors, YOLOv3Coder(), loss, num_classes, image_size, neck,
                **kwargs)  # fmt: skip


def yolov1(
    num_classes: int,
    image_size: int = 448,
    backbone: nn.Module | None = None,
    grid_size: int = 7,
    num_boxes: int = 2,
    downsample: bool = True,
    **kwargs,
) -> YOLO:
    """YOLOv1 detector: a stride-32 backbone, the conv head to an S x S grid, the paper's loss.

    ``downsample``: the head's stride-2 conv (stride 64: 7x7 at 448 px, as the paper); False
    keeps stride 32 (e.g. a 4x4 grid at 128 px)."""
    from detkit.matching import YOLOv1Coder, YOLOv1Grid
    from detkit.models.backbones.darknet import CSPDarknet
    from detkit.models.heads.yolo import YOLOv1Head
    from detkit.models.yolo_losses import YOLOv1Loss

    backbone = backbone if backbone is not None else CSPDarknet(out_stages=(4,))
    head = YOLOv1Head(
        backbone.out_channels, num_classes, grid_size, num_boxes, downsample=downsample
    )
    return YOLO(backbone, head, YOLOv1Grid(grid_size), YOLOv1Coder(), YOLOv1Loss(), num_classes,
                image_size, **kwargs)  # fmt: skip


def yolov8(
    num_classes: int,
    image_size: int = 640,
    backbone: nn.Module | None = None,
    reg_max: int = 16,
    **kwargs,
) -> YOLO:
    """Anchor-free YOLO (YOLOv8 style): CSP-Darknet (light default), PANet neck, decoupled head
    with distribution-focal distances from anchor points, task-aligned assignment."""
    from detkit.matching import AnchorPoints, DistanceCoder
    from detkit.models.backbones.darknet import CSPDarknet
    from detkit.models.heads.yolo import YOLOv8Head
    from detkit.models.necks.yolo_pan import YOLOPAN
    from detkit.models.yolo_losses import YOLOv8Loss

    backbone = backbone if backbone is not None else CSPDarknet()
    neck = YOLOPAN(backbone.out_channels, bottom_up=True)
    head = YOLOv8Head(neck.out_channels, num_classes, reg_max, image_size=image_size)
    return YOLO(backbone, head, AnchorPoints(), DistanceCoder(reg_max), YOLOv8Loss(), num_classes,
                image_size, neck, **kwargs)  # fmt: skip
