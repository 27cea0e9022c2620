"""YOLO detectors: backbone -> (neck) -> head -> loss / decode + multiclass NMS.

Composition only. The version lives in the parts: :class:`~detkit.models.heads.yolo.YOLOv1Head`
with :class:`~detkit.models.yolo_losses.YOLOv1Loss` is the YOLOv1 of the paper (S x S grid, B
boxes and one class distribution per cell); a feature-pyramid neck with
:class:`~detkit.models.heads.yolo.YOLOv3Head` and :class:`~detkit.models.yolo_losses.YOLOv3Loss`
is the YOLOv3-style multi-scale anchor detector. :func:`yolov1` and :func:`yolov3` build both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from detkit.models.transform import Normalize, check_inputs
from detkit.structures import DetectorOutput, Targets, pad_targets, unpad_detections

HeadFactory = Callable[..., nn.Module]


class YOLO(nn.Module):
    """A one-stage grid detector (YOLOv1 or YOLOv3 style, chosen by its head and loss).

    Args:
        backbone: returns a list of feature maps and exposes ``out_channels``.
        num_classes: object classes C (YOLO needs no background class).
        head: a head module, or a factory (e.g. a Hydra ``_partial_`` node) called as
            ``head(in_channels=..., num_classes=...)`` with the neck's (or backbone's) channels.
        loss: ``loss(raw, gt: PaddedTargets, image_size, head) -> dict`` of loss terms.
        neck: optional; maps the backbone's features to the head's inputs (``out_channels``);
            a module, or a factory called as ``neck(in_channels=backbone.out_channels)``.
        image_size: the size the data transforms letterbox/resize to (the model never resizes).
        score_threshold, nms_threshold, detections_per_image, topk_candidates: inference
            (threshold on class-specific confidence, then ``multiclass_nms``).
        image_mean, image_std: normalisation applied to the ``[0, 1]`` input images.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        head: nn.Module | HeadFactory,
        loss: nn.Module,
        neck: nn.Module | Callable[..., nn.Module] | None = None,
        image_size: int | Sequence[int] = 416,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        detections_per_image: int = 100,
        topk_candidates: int = 1000,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"YOLO: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.image_size = (
            (image_size, image_size)
            if isinstance(image_size, int)
            else tuple(int(v) for v in image_size)
        )
        self.normalize = Normalize(image_mean, image_std)
        self.backbone = backbone
        if neck is not None and not isinstance(neck, nn.Module):
            neck = neck(in_channels=list(backbone.out_channels))
        self.neck = neck if neck is not None else nn.Identity()
        if not isinstance(head, nn.Module):
            source = neck if neck is not None else backbone
            head = head(in_channels=list(source.out_channels), num_classes=self.num_classes)
        if getattr(head, "num_classes", self.num_classes) != self.num_classes:
            raise ValueError(
                f"YOLO: head predicts {head.num_classes} classes but num_classes={num_classes}"
            )
        self.head = head
        self.loss = loss
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = int(detections_per_image)
        self.topk_candidates = int(topk_candidates)

    def forward(
        self,
        images: Tensor,
        targets: Targets | None = None,
        return_detections: bool | None = None,
    ) -> DetectorOutput:
        """Losses when ``targets`` are given; detections in eval mode (or when asked)."""
        want_detections = check_inputs(self, images, targets, return_detections)
        image_size = (int(images.shape[-2]), int(images.shape[-1]))
        raw = self.head(self.neck(self.backbone(self.normalize(images))))
        output = DetectorOutput()
        if targets is not None:
            gt = pad_targets(targets, device=images.device)
            output.losses = self.loss(raw, gt, image_size, self.head)
        if want_detections:
            with torch.no_grad():
                output.detections = self.postprocess(raw, image_size)
        return output

    def postprocess(self, raw, image_size: tuple[int, int]):
        """Decode, clip, threshold class-specific confidences and run ``multiclass_nms``."""
        from detkit.ops import clip_boxes, multiclass_nms

        boxes, scores = self.head.decode(raw, image_size)
        boxes = clip_boxes(boxes.float(), image_size)
        out = multiclass_nms(
            boxes,
            scores.float(),
            self.score_threshold,
            self.nms_threshold,
            self.detections_per_image,
            pre_nms_top_k=self.topk_candidates,
        )
        return unpad_detections(*out)


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
    from detkit.models.backbones.darknet import CSPDarknet
    from detkit.models.heads.yolo import YOLOv3Head
    from detkit.models.necks.yolo_pan import YOLOPAN
    from detkit.models.yolo_losses import YOLOv3Loss

    backbone = backbone if backbone is not None else CSPDarknet()
    neck = YOLOPAN(backbone.out_channels)
    head = YOLOv3Head(neck.out_channels, num_classes, priors)
    loss = YOLOv3Loss(box_loss, ignore_threshold)
    return YOLO(backbone, num_classes, head, loss, neck, image_size, **kwargs)


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
    from detkit.models.backbones.darknet import CSPDarknet
    from detkit.models.heads.yolo import YOLOv1Head
    from detkit.models.yolo_losses import YOLOv1Loss

    backbone = backbone if backbone is not None else CSPDarknet(out_stages=(4,))
    head = YOLOv1Head(
        backbone.out_channels, num_classes, grid_size, num_boxes, downsample=downsample
    )
    return YOLO(backbone, num_classes, head, YOLOv1Loss(), None, image_size, **kwargs)
