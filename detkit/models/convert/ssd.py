"""Moving weights from torchvision's ``ssd300_vgg16`` into a detkit SSD.

Our VGG16 backbone mirrors torchvision's module names (only the L2Norm scale is renamed); the
head fuses torchvision's separate classification/regression convs into one conv per level,
with the channels of each default box grouped as ``[C + 1 logits, 4 offsets]``.

torchvision's COCO detectors index their classifier rows by COCO category id (91 rows: 0 is
background, the ten ids COCO never uses are "N/A"); :func:`coco_classifier_rows` says which of
those rows give our ``[background, 0..C-1]`` logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detkit.matching import DefaultBoxGenerator, DeltaXYWHCoder, HardNegativeSampler, SSDMatcher
from detkit.models.backbones.vgg import VGG16Backbone
from detkit.models.heads.ssd import SSDHead
from detkit.models.losses import MultiBoxLoss


def _check_torchvision_ssd(model: nn.Module) -> None:
    from torchvision.models.detection.ssd import SSD as TorchvisionSSD
    from torchvision.models.detection.ssd import SSDFeatureExtractorVGG, SSDHead

    if not isinstance(model, TorchvisionSSD):
        raise ValueError(f"expected a torchvision SSD, got {type(model).__name__}")
    if not isinstance(model.backbone, SSDFeatureExtractorVGG) or len(model.backbone.extra) != 5:
        raise ValueError("only torchvision's ssd300_vgg16 (VGG16 backbone, 300x300) converts")
    if not isinstance(model.head, SSDHead):
        raise ValueError(f"expected torchvision's SSDHead, got {type(model.head).__name__}")


def ssd_from_torchvision(cls: type, model: nn.Module) -> nn.Module:
    """Build ``cls`` (detkit's SSD) with the configuration and weights of ``model``."""

    _check_torchvision_ssd(model)
    anchors = model.anchor_generator
    fixed_w, fixed_h = model.transform.fixed_size  # torchvision stores (w, h)
    num_classes = model.head.classification_head.num_columns - 1
    prior_generator = DefaultBoxGenerator(
        [list(r) for r in anchors.aspect_ratios],
        scales=list(anchors.scales),
        steps=None if anchors.steps is None else list(anchors.steps),
        clip=anchors.clip,
    )
    backbone = VGG16Backbone()
    ours = cls(
        backbone,
        SSDHead(backbone.out_channels, prior_generator.num_anchors_per_location(), num_classes),
        prior_generator,
        DeltaXYWHCoder(tuple(model.box_coder.weights), model.box_coder.bbox_xform_clip),
        MultiBoxLoss(
            SSDMatcher(model.proposal_matcher.high_threshold),
            HardNegativeSampler(model.neg_to_pos_ratio),
        ),
        num_classes=num_classes,
        image_size=(fixed_h, fixed_w),
        score_threshold=model.score_thresh,
        nms_threshold=model.nms_thresh,
        detections_per_image=model.detections_per_img,
        topk_candidates_per_class=model.topk_candidates,
        image_mean=model.transform.image_mean,
        image_std=model.transform.image_std,
    )
    rows = range(model.head.classification_head.num_columns)  # the same classes, in order
    ours.load_state_dict(convert_state_dict(model.state_dict(), ours.state_dict(), rows))
    return ours


def coco_classifier_rows(
    their_logits: int, num_classes: int, categories: Sequence[str]
) -> list[int] | None:
    """The rows of a torchvision COCO classifier that give our logits ``[background, 0..C-1]``.

    ``categories`` are the weights' ``meta["categories"]``: one name per row, row = COCO
    category id, ``"__background__"`` at 0 and ``"N/A"`` for the ids COCO does not use.

    - ``C + 1`` rows: the same classes in the same order (a model converted as it is);
    - ``C`` = the named categories (COCO's 80): label ``l`` is the ``l``-th category id in
      increasing order, as detkit's COCO loader numbers them, so its row is that id;
    - otherwise ``None``: no row belongs to our classes.
    """
    if their_logits == num_classes + 1:
        return list(range(their_logits))
    ids = [i for i, name in enumerate(categories) if i > 0 and name != "N/A"]
    if len(categories) == their_logits and len(ids) == num_classes:
        return [0, *ids]
    return None


def convert_state_dict(
    theirs: dict[str, Tensor],
    ours: dict[str, Tensor],
    classifier_rows: Sequence[int] | None,
) -> dict[str, Tensor]:
    """torchvision SSD300 state dict -> ours. ``classifier_rows``: which of their class logits
    become ours, in our order (:func:`coco_classifier_rows`); ``None`` keeps our classifier
    (``ours`` gives the shapes and the values kept)."""
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
            out[f"head.predictors.{level}.{kind}"] = _fuse(cls_w, reg_w, target, classifier_rows)
        level += 1
    return out


def _fuse(
    cls_w: Tensor, reg_w: Tensor, target: Tensor, classifier_rows: Sequence[int] | None
) -> Tensor:
    anchors = reg_w.shape[0] // 4
    rest = target.shape[1:]
    fused = target.clone().view(anchors, -1, *rest)
    num_logits = fused.shape[1] - 4
    fused[:, num_logits:] = reg_w.view(anchors, 4, *rest)
    if classifier_rows is not None:
        rows = list(classifier_rows)
        their_logits = cls_w.shape[0] // anchors
        if len(rows) != num_logits or not all(0 <= r < their_logits for r in rows):
            raise ValueError(
                f"torchvision head has {their_logits} classes per box, ours {num_logits} "
                f"(num_classes + background): classifier rows {rows[:5]}... do not fit"
            )
        fused[:, :num_logits] = cls_w.view(anchors, their_logits, *rest)[:, rows]
    return fused.view_as(target)


@torch.no_grad()
def load_ssd_torchvision_weights(model: nn.Module, pretrained: str) -> None:
    """``pretrained="torchvision"``: download torchvision's COCO ssd300_vgg16 and copy it in.

    The backbone and the box regressors are always copied, and the images are normalised the
    way those weights expect. The classifier is copied for COCO's 80 classes (``num_classes``
    80, labels in category-id order as detkit's COCO loader gives them: each label takes the
    row of its category id, so the detections are torchvision's with our labels) and for
    torchvision's own 90 (category id - 1); other class counts train their own. With 80,
    the softmax runs over 81 of the 91 rows: the share torchvision gives the ten unused ids
    (never a training target) is left out of the scores.
    """
    if pretrained != "torchvision":
        raise ValueError(f"pretrained={pretrained!r}: only None or 'torchvision' is supported")
    if not isinstance(model.backbone, VGG16Backbone):
        raise ValueError("pretrained='torchvision' needs the vgg16 backbone (model/backbone=vgg16)")
    from torchvision.models.detection import SSD300_VGG16_Weights, ssd300_vgg16

    theirs = ssd300_vgg16(weights="DEFAULT")
    rows = coco_classifier_rows(
        theirs.head.classification_head.num_columns,
        model.num_classes,
        SSD300_VGG16_Weights.DEFAULT.meta["categories"],
    )
    if rows is None:
        warnings.warn(
            f"pretrained='torchvision': num_classes={model.num_classes} is neither COCO's 80 "
            "nor torchvision's 90, so the classifier starts from scratch (backbone and box "
            "regressors are copied)",
            stacklevel=3,
        )
    state = convert_state_dict(theirs.state_dict(), model.state_dict(), rows)
    model.load_state_dict(state)
    model.normalize.set_(theirs.transform.image_mean, theirs.transform.image_std)
