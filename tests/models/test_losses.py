"""MultiBoxLoss against torchvision's SSD.compute_loss, plus its edge cases."""

from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.ssd import SSD as TorchvisionSSD
from torchvision.ops import box_iou, generalized_box_iou_loss

from detkit.matching import DeltaXYWHCoder, HardNegativeSampler, SSDMatcher
from detkit.models.heads.ssd import SSDOutput
from detkit.models.losses import MultiBoxLoss
from detkit.models.softmax import VECTOR_CLASSES
from detkit.structures import pad_targets


def _priors(n_side=8, size=64.0):
    step = size / n_side
    c = (torch.arange(n_side) + 0.5) * step
    cy, cx = torch.meshgrid(c, c, indexing="ij")
    centres = torch.stack([cx.flatten(), cy.flatten()], -1).repeat_interleave(2, 0)
    half = torch.tensor([[step, step], [1.6 * step, 0.8 * step]]).repeat(n_side * n_side, 1) / 2
    return torch.cat([centres - half, centres + half], 1)


def _targets():
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 20.0, 18.0], [30.0, 30.0, 60.0, 50.0]]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[10.0, 40.0, 26.0, 58.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # fmt: skip


def _loss(sampler=None, **kwargs):
    """The loss as SSD calls it: the head's outputs, the priors, the detector's coder."""
    loss = MultiBoxLoss(SSDMatcher(0.5), sampler or HardNegativeSampler(3), **kwargs)
    coder = DeltaXYWHCoder((10, 10, 5, 5))

    def call(cls_logits, box_deltas, priors, gt):
        return loss(SSDOutput(cls_logits, box_deltas), priors, coder, gt)

    return call


def _torchvision_loss(targets, cls_logits, box_deltas, priors):
    matcher = det_utils.SSDMatcher(0.5)
    matched = []
    for t in targets:
        if len(t["boxes"]) == 0:  # torchvision's forward does the same for empty images
            matched.append(torch.full((len(priors),), -1, dtype=torch.int64))
        else:
            matched.append(matcher(box_iou(t["boxes"], priors)))
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    fake_self = SimpleNamespace(box_coder=det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)),
                                neg_to_pos_ratio=3.0)  # fmt: skip
    head = {"cls_logits": cls_logits, "bbox_regression": box_deltas}
    anchors = [priors] * len(targets)
    return TorchvisionSSD.compute_loss(fake_self, tv_targets, head, anchors, matched)


@pytest.mark.parametrize("num_logits", [4, VECTOR_CLASSES + 5])  # each softmax layout
def test_loss_equals_torchvision_compute_loss(num_logits):
    priors = _priors()
    targets = _targets()
    cls_logits = torch.randn(3, len(priors), num_logits)
    box_deltas = torch.randn(3, len(priors), 4)
    ours = _loss()(cls_logits, box_deltas, priors, pad_targets(targets))
    theirs = _torchvision_loss(targets, cls_logits, box_deltas, priors)
    assert set(ours) == {"box_regression", "classification"}
    for key, their_key in (("box_regression", "bbox_regression"), ("classification",) * 2):
        torch.testing.assert_close(ours[key], theirs[their_key], rtol=1e-5, atol=1e-5)


def test_giou_box_loss_is_torchvisions_giou_loss_of_the_decoded_matched_boxes():
    priors, targets = _priors(), _targets()
    cls_logits, box_deltas = torch.randn(3, len(priors), 4), 0.5 * torch.randn(3, len(priors), 4)
    ours = _loss(box_loss="giou", alpha=2.0)(cls_logits, box_deltas, priors, pad_targets(targets))
    # Oracle: torchvision's matcher, box decoder and GIoU loss, image by image.
    matcher, coder = det_utils.SSDMatcher(0.5), det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    total, matched_count = 0.0, 0
    for b, t in enumerate(targets):
        if len(t["boxes"]) == 0:
            continue
        matched = matcher(box_iou(t["boxes"], priors))
        fg = torch.where(matched >= 0)[0]
        decoded = coder.decode_single(box_deltas[b, fg], priors[fg])
        total += generalized_box_iou_loss(decoded, t["boxes"][matched[fg]], reduction="sum")
        matched_count += len(fg)
    torch.testing.assert_close(ours["box_regression"], 2.0 * total / matched_count)
    # the classification term does not depend on the box loss
    plain = _loss()(cls_logits, box_deltas, priors, pad_targets(targets))
    torch.testing.assert_close(ours["classification"], plain["classification"])
    with pytest.raises(ValueError, match="box_loss"):
        MultiBoxLoss(SSDMatcher(0.5), HardNegativeSampler(3), box_loss="l2")


def test_hard_negatives_are_the_worst_three_per_positive():
    priors = _priors()
    targets = _targets()
    seen = {}
    sampler = HardNegativeSampler(3)

    def spy(conf_loss, positive):
        seen["conf"], seen["pos"] = conf_loss, positive
        seen["neg"] = sampler(conf_loss, positive)
        return seen["neg"]

    loss = _loss(spy)
    out = loss(torch.randn(3, len(priors), 4), torch.randn(3, len(priors), 4), priors,
               pad_targets(targets))  # fmt: skip
    pos, neg, conf = seen["pos"], seen["neg"], seen["conf"]
    assert pos.sum(1).tolist()[2] == 0 and pos.sum() > 0
    assert neg.sum(1).tolist() == (3 * pos.sum(1)).tolist()
    assert not (neg & pos).any()
    for b in range(2):  # every picked negative is at least as hard as every skipped one
        background = conf[b][~pos[b]]
        picked = conf[b][neg[b]]
        assert picked.min() >= background.topk(len(picked)).values.min()
    expected = (conf[pos].sum() + conf[neg].sum()) / pos.sum()
    torch.testing.assert_close(out["classification"], expected)


def test_no_ground_truth_gives_zero_loss_without_nan():
    priors = _priors()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    cls_logits = torch.randn(2, len(priors), 4, requires_grad=True)
    box_deltas = torch.randn(2, len(priors), 4, requires_grad=True)
    out = _loss()(cls_logits, box_deltas, priors, pad_targets(empty))
    assert out["classification"].item() == 0.0 and out["box_regression"].item() == 0.0
    (out["classification"] + out["box_regression"]).backward()
    assert torch.isfinite(cls_logits.grad).all() and torch.isfinite(box_deltas.grad).all()


def test_gradients_reach_logits_and_offsets_of_matched_priors():
    priors = _priors()
    cls_logits = torch.randn(3, len(priors), 4, requires_grad=True)
    box_deltas = torch.randn(3, len(priors), 4, requires_grad=True)
    out = _loss()(cls_logits, box_deltas, priors, pad_targets(_targets()))
    sum(out.values()).backward()
    assert cls_logits.grad.abs().sum() > 0
    moved = box_deltas.grad.abs().sum(-1) > 0
    assert moved[0].any() and moved[1].any() and not moved[2].any()
