"""RPN: head layout, losses and proposals against torchvision's RegionProposalNetwork."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detkit.matching import (
    AnchorGenerator,
    BalancedPositiveNegativeSampler,
    DeltaXYWHCoder,
    Matcher,
)
from detkit.models.heads.rpn import RegionProposalNetwork, RPNHead
from detkit.structures import pad_targets

SIZES, RATIOS = ((16,), (32,)), ((0.5, 1.0, 2.0),) * 2
IMAGE = (64, 64)


def _features(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 8, 16, 16, generator=g), torch.randn(batch, 8, 8, 8, generator=g)]


def _propose(rpn, feats, sizes, gt=None):
    """Per-image proposals (the padded ones cut at each count) and the losses."""
    (proposals, num), losses = rpn(feats, IMAGE, torch.tensor(sizes), gt)
    return [p[:n] for p, n in zip(proposals, num.tolist(), strict=True)], losses


def _targets() -> list[dict]:
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 20.0, 60.0, 50.0]]),
         "labels": torch.tensor([0, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # fmt: skip


def _pair(
    sample_all: bool = True, **kw
) -> tuple[tv_rpn.RegionProposalNetwork, RegionProposalNetwork]:
    """torchvision's RPN and ours with the same head weights; ``sample_all`` makes both
    samplers take every labelled anchor so the losses are deterministic."""
    torch.manual_seed(0)
    batch, frac = (10**6, 1.0) if sample_all else (256, 0.5)
    top = dict(topk_candidates_per_level_train=300, proposals_per_image_train=200)
    top.update(topk_candidates_per_level_test=100, proposals_per_image_test=50)
    theirs = tv_rpn.RegionProposalNetwork(
        TVAnchorGenerator(SIZES, RATIOS), tv_rpn.RPNHead(8, 3), 0.7, 0.3, batch, frac,
        {"training": 300, "testing": 100}, {"training": 200, "testing": 50}, 0.7,
    )  # fmt: skip
    ours = RegionProposalNetwork(
        AnchorGenerator(SIZES, RATIOS), RPNHead(8, 3), Matcher(0.7, 0.3, True),
        BalancedPositiveNegativeSampler(batch, frac), DeltaXYWHCoder(), **top, **kw,
    )  # fmt: skip
    ours.head.load_state_dict(theirs.head.state_dict())
    return theirs, ours


def test_head_layout_matches_torchvision_concat() -> None:
    theirs, ours = _pair()
    feats = _features()
    obj, deltas = ours.head(feats)
    t_obj, t_deltas = tv_rpn.concat_box_prediction_layers(*theirs.head(feats))
    assert obj.shape == (2, 3 * (256 + 64)) and deltas.shape == (2, 3 * (256 + 64), 4)
    torch.testing.assert_close(obj.reshape(-1, 1), t_obj)
    torch.testing.assert_close(deltas.reshape(-1, 4), t_deltas)


@pytest.mark.parametrize("training", [False, True])
def test_proposals_and_losses_equal_torchvision(training: bool) -> None:
    theirs, ours = _pair()
    theirs.train(training), ours.train(training)
    feats, targets = _features(), _targets()
    images = ImageList(torch.zeros(2, 3, *IMAGE), [IMAGE, IMAGE])
    t_boxes, t_losses = theirs(images, {"0": feats[0], "1": feats[1]}, targets)
    gt = pad_targets(targets)
    boxes, losses = _propose(ours, feats, [IMAGE, IMAGE], gt)
    for a, b in zip(boxes, t_boxes, strict=True):
        assert len(a) == len(b) > 0
        torch.testing.assert_close(a, b)
    assert max(len(b) for b in boxes) <= (200 if training else 50)
    if not training:  # torchvision computes RPN losses only in training mode
        assert set(losses) == {"rpn_objectness", "rpn_box_regression"}
        return
    torch.testing.assert_close(losses["rpn_objectness"], t_losses["loss_objectness"])
    torch.testing.assert_close(losses["rpn_box_regression"], t_losses["loss_rpn_box_reg"])


def test_sampling_counts_and_empty_ground_truth() -> None:
    _, ours = _pair(sample_all=False)
    anchors, _ = ours.anchors(IMAGE, _features())
    gt = pad_targets(_targets())
    match = ours.label_anchors(anchors, gt, torch.tensor([IMAGE, IMAGE]))
    pos, neg = ours.sampler(match.labels)
    assert (pos | neg).sum(1).tolist() == [256, 256]
    assert 2 <= int(pos[0].sum()) <= 128  # each gt keeps at least its best anchor
    assert int(pos[1].sum()) == 0  # no ground truth: negatives only
    # The RPN box loss of an image without ground truth is zero.
    one_image = [f[1:] for f in _features()]
    _, losses = _propose(ours, one_image, [IMAGE], pad_targets(_targets()[1:]))
    assert losses["rpn_box_regression"].item() == 0.0 and losses["rpn_objectness"].item() > 0


def test_cross_boundary_anchors_are_ignored() -> None:
    _, ours = _pair(sample_all=False, remove_cross_boundary=True)
    anchors, _ = ours.anchors(IMAGE, _features())
    gt = pad_targets(_targets())
    match = ours.label_anchors(anchors, gt, torch.tensor([IMAGE, IMAGE]))
    inside = AnchorGenerator.inside_image(anchors, IMAGE)
    assert 0 < int(inside.sum()) < len(anchors)
    assert (match.labels[:, ~inside] == -1).all()
    # Inside anchors: torchvision's Matcher run on the inside anchors alone (the paper removes
    # the others before labelling, so a gt's best anchor is its best *inside* anchor).
    from torchvision.models.detection._utils import Matcher as TVMatcher
    from torchvision.ops import box_iou

    codes = TVMatcher(0.7, 0.3, True)(box_iou(gt.boxes[0], anchors[inside]))
    expected = torch.where(codes >= 0, 1, torch.where(codes == -1, 0, -1))
    assert torch.equal(match.labels[0, inside].long(), expected)
    assert (match.labels[1, inside] == 0).all()  # no ground truth: all negative


def test_proposals_clipped_to_each_image_size_and_none_left() -> None:
    _, ours = _pair()
    ours.eval()
    sizes = [(40, 50), IMAGE]
    boxes, _ = _propose(ours, _features(), sizes)
    assert boxes[0][:, 2].max() <= 50 and boxes[0][:, 3].max() <= 40
    assert boxes[1][:, 2].max() > 50
    ours.score_threshold = 1.1  # nothing survives
    boxes, _ = _propose(ours, _features(), sizes)
    assert [len(b) for b in boxes] == [0, 0]
