"""Build a detkit :class:`FasterRCNN` from a torchvision Faster R-CNN (configuration and weights).

detkit's Faster R-CNN parts use torchvision's module names (``backbone.body``,
``backbone.fpn``, ``rpn.head``, ``roi_heads.box_head``, ``roi_heads.box_predictor``), so the
state dict loads as it is; only the normalisation buffers are ours.
"""

from __future__ import annotations

from torch import nn

from detkit.matching import (
    AnchorGenerator,
    BalancedPositiveNegativeSampler,
    DeltaXYWHCoder,
    Matcher,
)
from detkit.models.backbones.rcnn_backbones import MobileNetV3FPNBackbone, ResNetFPNBackbone
from detkit.models.heads.roi_heads import FastRCNNPredictor, RoIHeads, RoIPooler, TwoMLPHead
from detkit.models.heads.rpn import RegionProposalNetwork, RPNHead


def _backbone_from_torchvision(backbone: nn.Module) -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    body, fpn = getattr(backbone, "body", None), getattr(backbone, "fpn", None)
    if body is None or fpn is None or not isinstance(fpn.extra_blocks, LastLevelMaxPool):
        raise ValueError("from_torchvision supports torchvision's FPN backbones only")
    frozen = any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    norm = "frozen" if frozen else "batch"
    width = fpn.layer_blocks[0][0].out_channels
    if "layer1" in body:
        bottleneck = type(body.layer1[0]).__name__ == "Bottleneck"
        depth = {(True, 6): 50, (True, 23): 101, (False, 2): 18, (False, 6): 34}.get(
            (bottleneck, len(body.layer3))
        )
        if depth is None or "layer4" not in body:
            raise ValueError("unsupported torchvision ResNet body (need resnet18/34/50/101)")
        returned = [int(name[-1]) for name in body.return_layers]
        return ResNetFPNBackbone(depth, None, 5, returned, width, norm)
    if "16" in body:
        return MobileNetV3FPNBackbone(None, 6, width, norm)
    raise ValueError(f"unsupported torchvision backbone body {type(body).__name__}")


def faster_rcnn_from_torchvision(cls: type, model: nn.Module) -> nn.Module:
    """``cls`` (detkit's FasterRCNN) with ``model``'s settings and weights."""
    from torchvision.models.detection import FasterRCNN as TorchvisionFasterRCNN

    if not isinstance(model, TorchvisionFasterRCNN):
        raise ValueError(f"expected a torchvision FasterRCNN, got {type(model).__name__}")
    rpn, heads = model.rpn, model.roi_heads

    def matcher(m):
        return Matcher(m.high_threshold, m.low_threshold, m.allow_low_quality_matches)

    def sampler(s):
        return BalancedPositiveNegativeSampler(s.batch_size_per_image, s.positive_fraction)

    def coder(c):
        return DeltaXYWHCoder(tuple(c.weights), c.bbox_xform_clip)

    backbone = _backbone_from_torchvision(model.backbone)
    anchors = AnchorGenerator(rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios)
    width = backbone.out_channels[0]
    our_rpn = RegionProposalNetwork(
        anchors,
        RPNHead(width, anchors.num_anchors_per_location()[0], len(rpn.head.conv)),
        matcher=matcher(rpn.proposal_matcher),
        sampler=sampler(rpn.fg_bg_sampler),
        box_coder=coder(rpn.box_coder),
        topk_candidates_per_level_train=rpn._pre_nms_top_n["training"],
        proposals_per_image_train=rpn._post_nms_top_n["training"],
        topk_candidates_per_level_test=rpn._pre_nms_top_n["testing"],
        proposals_per_image_test=rpn._post_nms_top_n["testing"],
        nms_threshold=rpn.nms_thresh,
        score_threshold=rpn.score_thresh,
        min_size=rpn.min_size,
        remove_cross_boundary=False,
    )
    pool = heads.box_roi_pool
    levels = _level_indices(list(pool.featmap_names), len(backbone.out_channels) - 1)
    representation = heads.box_head.fc7.out_features
    num_classes = heads.box_predictor.cls_score.out_features - 1
    our_heads = RoIHeads(
        RoIPooler(pool.output_size[0], pool.sampling_ratio, "align", levels),
        TwoMLPHead(width, pool.output_size[0], representation),
        FastRCNNPredictor(representation, num_classes),
        matcher=matcher(heads.proposal_matcher),
        sampler=sampler(heads.fg_bg_sampler),
        box_coder=coder(heads.box_coder),
        score_threshold=heads.score_thresh,
        nms_threshold=heads.nms_thresh,
        detections_per_image=heads.detections_per_img,
    )
    ours = cls(
        backbone,
        our_rpn,
        our_heads,
        num_classes,
        image_size=int(model.transform.min_size[-1]),
        image_mean=model.transform.image_mean,
        image_std=model.transform.image_std,
    )
    state = model.state_dict()
    result = ours.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("normalize.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"torchvision weights do not fit: missing {missing[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}"
        )
    return ours


def _level_indices(featmap_names: list[str], num_maps: int) -> list[int]:
    """torchvision pools the FPN maps named "0", "1", ... that exist (its "pool" level never),
    skipping absent names; our backbone returns them in that order before the pooled level."""
    if not all(n.isdigit() for n in featmap_names):
        raise ValueError(f"unsupported MultiScaleRoIAlign featmap_names {featmap_names}")
    return [int(n) for n in featmap_names if int(n) < num_maps]
