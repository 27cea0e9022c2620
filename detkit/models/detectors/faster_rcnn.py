"""Faster R-CNN (Ren et al., 2015): backbone (optionally with FPN), Region Proposal Network
and Fast R-CNN RoI heads, trained jointly. Composition only; the parts live in
:mod:`detkit.models.heads.rpn`, :mod:`detkit.models.heads.roi_heads` and the backbones."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detkit.models.heads.roi_heads import RoIHeads
from detkit.models.heads.rpn import RegionProposalNetwork, RPNHead
from detkit.models.transform import Normalize, check_inputs
from detkit.structures import DetectorOutput, Targets, pad_targets


class FasterRCNN(nn.Module):
    """Two-stage detector; ``forward(images, targets=None) -> DetectorOutput``.

    Losses: ``rpn_objectness``, ``rpn_box``, ``classification``, ``box_regression``.
    Images are ``[B, 3, H, W]`` in ``[0, 1]``, already resized/padded by the data pipeline;
    proposals and detections are clipped to the tensor size, or to each target's ``size``
    ``(h, w)`` when the targets carry one.

    Args:
        backbone: returns a list of maps (all with the same channels) and has ``out_channels``.
        rpn: :class:`RegionProposalNetwork`; its head is built here when it is ``None``.
        roi_heads: :class:`RoIHeads`; box head / predictor are built here when ``None``.
        num_classes: object classes ``C`` (the box classifier adds background internally).
        image_size: the shorter side the ``rcnn`` transform resizes to (metadata for the data
            pipeline and export; the model never resizes).
        image_mean, image_std: normalisation of the ``[0, 1]`` input.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: RegionProposalNetwork,
        roi_heads: RoIHeads,
        num_classes: int,
        image_size: int | Sequence[int] = 600,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        channels = sorted(set(getattr(backbone, "out_channels", [])))
        if len(channels) != 1:
            raise ValueError(
                "FasterRCNN backbone must expose out_channels with one shared width (the RPN "
                f"head is shared across maps), got {getattr(backbone, 'out_channels', None)}"
            )
        self.num_classes = int(num_classes)
        self.image_size = image_size
        self.normalize = Normalize(image_mean, image_std)
        self.backbone = backbone
        if rpn.head is None:
            per_location = set(rpn.anchor_generator.num_anchors_per_location())
            if len(per_location) != 1:
                raise ValueError(f"anchors per location differ across levels: {per_location}")
            rpn.head = RPNHead(channels[0], per_location.pop())
        self.rpn = rpn
        roi_heads.build(channels[0], self.num_classes)
        predicted = roi_heads.box_predictor.cls_score.out_features
        if predicted != self.num_classes + 1:
            raise ValueError(
                f"roi_heads.box_predictor scores {predicted} classes, expected num_classes + 1"
                f" = {self.num_classes + 1} (background is added internally)"
            )
        self.roi_heads = roi_heads

    def forward(
        self,
        images: Tensor,
        targets: Targets | None = None,
        return_detections: bool | None = None,
    ) -> DetectorOutput:
        """Losses when ``targets`` are given; detections in eval mode (or when asked)."""
        want = check_inputs(self, images, targets, return_detections)
        features = self.backbone(self.normalize(images))
        if isinstance(features, Tensor):
            features = [features]
        shape = (int(images.shape[-2]), int(images.shape[-1]))
        sizes = _image_sizes(shape, images.shape[0], targets)
        gt = None if targets is None else pad_targets(targets, device=images.device)
        proposals, rpn_losses = self.rpn(features, shape, sizes, gt)
        detections, roi_losses = self.roi_heads(features, proposals, sizes, gt, want)
        return DetectorOutput(losses={**rpn_losses, **roi_losses}, detections=detections)

    @classmethod
    def from_torchvision(cls, model: nn.Module) -> FasterRCNN:
        """A detkit Faster R-CNN with the configuration and weights of a torchvision
        ``fasterrcnn_resnet50_fpn`` / ``fasterrcnn_mobilenet_v3_large(_320)_fpn`` (same
        eval-mode detections on images its transform does not resize; labels shifted down
        by one since torchvision counts background as class 0)."""
        from detkit.models.detectors.faster_rcnn_convert import faster_rcnn_from_torchvision

        return faster_rcnn_from_torchvision(cls, model)


def _image_sizes(shape: tuple[int, int], batch: int, targets: Targets | None):
    """Per-image valid (h, w): each target's ``size`` when given, else the tensor size."""
    if targets is None:
        return [shape] * batch
    sizes = []
    for t in targets:
        size = t.get("size")
        if size is None:
            sizes.append(shape)
        else:
            h, w = (int(v) for v in size)
            sizes.append((min(h, shape[0]), min(w, shape[1])))
    return sizes
