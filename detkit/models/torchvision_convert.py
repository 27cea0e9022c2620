"""Moving weights from torchvision's ``ssd300_vgg16`` into a detkit :class:`SSD`.

Our VGG16 backbone mirrors torchvision's module names (only the L2Norm scale is renamed); the
head fuses torchvision's separate classification/regression convs into one conv per level,
with the channels of each default box grouped as ``[C + 1 logits, 4 offsets]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from detkit.matching import DefaultBoxGenerator, DeltaXYWHCoder, HardNegativeSampler, SSDMatcher
from detkit.models.backbones.vgg import VGG16Backbone

if TYPE_CHECKING:
    from detkit.models.detectors.ssd import SSD


def _check_torchvision_ssd(model: nn.Module) -> None:
    from torchvision.models.detection.ssd import SSD as TorchvisionSSD
    from torchvision.models.detection.ssd import SSDFeatureExtractorVGG, SSDHead

    if not isinstance(model, TorchvisionSSD):
        raise ValueError(f"expected a torchvision SSD, got {type(model).__name__}")
    if not isinstance(model.backbone, SSDFeatureExtractorVGG) or len(model.backbone.extra) != 5:
        raise ValueError("only torchvision's ssd300_vgg16 (VGG16 backbone, 300x300) converts")
    if not isinstance(model.head, SSDHead):
        raise ValueError(f"expected torchvision's SSDHead, got {type(model.head).__name__}")


def ssd_from_torchvision(cls: type[SSD], model: nn.Module) -> SSD:
    """Build ``cls`` (detkit SSD) with the configuration and weights of ``model``."""

    _check_torchvision_ssd(model)
    anchors = model.anchor_generator
    fixed_w, fixed_h = model.transform.fixed_size  # torchvision stores (w, h)
    ours = cls(
        VGG16Backbone(),
        num_classes=model.head.classification_head.num_columns - 1,
        image_size=(fixed_h, fixed_w),
        prior_generator=DefaultBoxGenerator(
            [list(r) for r in anchors.aspect_ratios],
            scales=list(anchors.scales),
            steps=None if anchors.steps is None else list(anchors.steps),
            clip=anchors.clip,
        ),
        matcher=SSDMatcher(model.proposal_matcher.high_threshold),
        box_coder=DeltaXYWHCoder(tuple(model.box_coder.weights), model.box_coder.bbox_xform_clip),
        negative_sampler=HardNegativeSampler(model.neg_to_pos_ratio),
        score_threshold=model.score_thresh,
        nms_threshold=model.nms_thresh,
        detections_per_image=model.detections_per_img,
        topk_candidates=model.topk_candidates,
        image_mean=model.transform.image_mean,
        image_std=model.transform.image_std,
    )
    ours.load_state_dict(convert_state_dict(model.state_dict(), ours.state_dict()))
    return ours


def convert_state_dict(
    theirs: dict[str, Tensor], ours: dict[str, Tensor], copy_classifier: bool = True
) -> dict[str, Tensor]:
    """torchvision SSD300 state dict -> ours (``ours`` gives shapes and the values kept when
    ``copy_classifier`` is False, e.g. for a different number of classes)."""
    out = {k: v.clone() for k, v in ours.items()}
    for key, value in theirs.items():
        if key.startswith("backbone."):
            name = "backbone.l2norm.weight" if key == "backbone.scale_weight" else key
            if name not in out or out[name].shape != value.shape:
                raise ValueError(f"torchvision key {key} does not fit detkit's VGG16 backbone")
            out[name] = value.clone()
    level = 0
    while f"head.regression_head.module_list.{level}.weight" in theirs:
        for kind in ("weight", "bias"):
            cls_w = theirs[f"head.classification_head.module_list.{level}.{kind}"]
            reg_w = theirs[f"head.regression_head.module_list.{level}.{kind}"]
            target = out[f"head.predictors.{level}.{kind}"]
            out[f"head.predictors.{level}.{kind}"] = _fuse(cls_w, reg_w, target, copy_classifier)
        level += 1
    return out


def _fuse(cls_w: Tensor, reg_w: Tensor, target: Tensor, copy_classifier: bool) -> Tensor:
    anchors = reg_w.shape[0] // 4
    rest = target.shape[1:]
    fused = target.clone().view(anchors, -1, *rest)
    num_logits = fused.shape[1] - 4
    fused[:, num_logits:] = reg_w.view(anchors, 4, *rest)
    if copy_classifier:
        if cls_w.shape[0] != anchors * num_logits:
            raise ValueError(
                f"torchvision head has {cls_w.shape[0] // anchors} classes per box, ours "
                f"{num_logits} (num_classes + background)"
            )
        fused[:, :num_logits] = cls_w.view(anchors, num_logits, *rest)
    return fused.view_as(target)


@torch.no_grad()
def load_torchvision_ssd_weights(model: SSD, pretrained: str) -> None:
    """``pretrained="torchvision"``: download torchvision's COCO ssd300_vgg16 and copy it in.

    The classifier is copied only when ``num_classes`` is COCO's 90 (torchvision's 91 minus
    background); otherwise the backbone and the box regressors are, and the images are
    normalised the way those weights expect.
    """
    if pretrained != "torchvision":
        raise ValueError(f"pretrained={pretrained!r}: only None or 'torchvision' is supported")
    if not isinstance(model.backbone, VGG16Backbone):
        raise ValueError("pretrained='torchvision' needs the vgg16 backbone (model/backbone=vgg16)")
    from torchvision.models.detection import ssd300_vgg16

    theirs = ssd300_vgg16(weights="DEFAULT")
    same_classes = theirs.head.classification_head.num_columns == model.num_classes + 1
    state = convert_state_dict(theirs.state_dict(), model.state_dict(), same_classes)
    model.load_state_dict(state)
    model.normalize.set_(theirs.transform.image_mean, theirs.transform.image_std)
