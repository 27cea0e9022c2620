"""RoI heads: pooling, sampling, losses and detections against torchvision's RoIHeads."""

from __future__ import annotations

import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor as TVPredictor
from torchvision.models.detection.faster_rcnn import TwoMLPHead as TVTwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads
from torchvision.ops import MultiScaleRoIAlign, roi_pool

from detkit.matching import BalancedPositiveNegativeSampler, DeltaXYWHCoder, Matcher
from detkit.models.heads.roi_heads import FastRCNNPredictor, RoIHeads, RoIPooler, TwoMLPHead
from detkit.structures import pad_targets, unpad_detections

IMAGE = (128, 160)


def _features(levels: int = 4, channels: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(2, channels, IMAGE[0] // 2 ** (k + 2), IMAGE[1] // 2 ** (k + 2), generator=g)
        for k in range(levels)
    ]


def _boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([140.0, 110.0])
    wh = torch.rand(n, 2, generator=g) * 120 + 2
    return torch.cat([xy, xy + wh], 1).clamp(max=torch.tensor([160.0, 128, 160, 128]))


def _targets() -> list[dict]:
    return [
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0], [70.0, 30.0, 150.0, 120.0]]),
         "labels": torch.tensor([2, 0])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # fmt: skip


def test_multiscale_pooler_equals_torchvision() -> None:
    feats = _features()
    boxes = [_boxes(40, 0), _boxes(30, 1)]
    boxes[1][3, 0] = float("nan")  # no level: a row of zeros, as torchvision gives
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)]
    )
    theirs = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = theirs({str(k): f for k, f in enumerate(feats)}, boxes, [IMAGE, IMAGE])
    got = RoIPooler(7, 2, "align")(feats, rois, IMAGE)
    torch.testing.assert_close(got, expected)
    assert not got[43].any() and got.isfinite().all()
    # The paper's single-map RoI max pooling at stride 16.
    pooled = RoIPooler(7, mode="pool")(feats[2:3], rois, IMAGE)
    torch.testing.assert_close(pooled, roi_pool(feats[2], rois, 7, 1 / 16))


def _pair(sample_all: bool = True) -> tuple[TVRoIHeads, RoIHeads]:
    torch.manual_seed(0)
    batch, frac = (10**6, 1.0) if sample_all else (512, 0.25)
    theirs = TVRoIHeads(
        MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), TVTwoMLPHead(4 * 49, 32),
        TVPredictor(32, 4), 0.5, 0.5, batch, frac, None, 0.05, 0.5, 100,
    )  # fmt: skip
    ours = RoIHeads(
        RoIPooler(7, 2), TwoMLPHead(4, 7, 32), FastRCNNPredictor(32, 3),
        Matcher(0.5, 0.5, False), BalancedPositiveNegativeSampler(batch, frac),
        DeltaXYWHCoder((10.0, 10.0, 5.0, 5.0)),
    )  # fmt: skip
    ours.box_head.load_state_dict(theirs.box_head.state_dict())
    ours.box_predictor.load_state_dict(theirs.box_predictor.state_dict())
    return theirs, ours


def _detect(heads: RoIHeads, feats, proposals: list[torch.Tensor]) -> list[dict]:
    """Detections of per-image proposals through the batched inference: proposals padded to
    ``[B, K, 4]`` with a count, candidates, selection, unpadded."""
    most = max(1, max(len(p) for p in proposals))
    padded = torch.zeros(len(proposals), most, 4)
    for i, p in enumerate(proposals):
        padded[i, : len(p)] = p
    num = torch.tensor([len(p) for p in proposals])
    sizes = torch.tensor([IMAGE] * len(proposals))
    candidates = heads.candidates(feats, padded, num, IMAGE, sizes)
    return unpad_detections(*heads.select(*candidates))


def test_losses_and_detections_equal_torchvision() -> None:
    theirs, ours = _pair()
    feats, proposals, targets = _features(), [_boxes(60, 2), _boxes(50, 3)], _targets()
    named = {str(k): f for k, f in enumerate(feats)}
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    _, t_losses = theirs.train()(named, [p.clone() for p in proposals], [IMAGE] * 2, tv_targets)
    losses = ours.train().loss(feats, proposals, IMAGE, pad_targets(targets))
    torch.testing.assert_close(losses["classification"], t_losses["loss_classifier"])
    torch.testing.assert_close(losses["box_regression"], t_losses["loss_box_reg"])
    theirs.score_thresh = ours.score_threshold = 0.0
    t_dets, _ = theirs.eval()(named, proposals, [IMAGE] * 2)
    detections = _detect(ours.eval(), feats, proposals)
    for ours_d, theirs_d in zip(detections, t_dets, strict=True):
        assert len(ours_d["boxes"]) == len(theirs_d["boxes"]) > 10
        torch.testing.assert_close(ours_d["boxes"], theirs_d["boxes"])
        torch.testing.assert_close(ours_d["scores"], theirs_d["scores"])
        assert torch.equal(ours_d["labels"], theirs_d["labels"] - 1)


def test_sampling_counts_and_ground_truth_as_proposals() -> None:
    _, ours = _pair(sample_all=False)
    proposals = [_boxes(900, 4), torch.zeros(0, 4)]
    gt = pad_targets(_targets())
    rois, classes, box_targets = ours.sample(proposals, gt)
    first = rois[:, 0] == 0
    assert int(first.sum()) == 512 and int((classes[first] > 0).sum()) <= 128
    assert int((~first).sum()) == 0  # image 2: no proposals, no ground truth
    positives = rois[classes > 0, 1:]
    for box, label in zip(gt.boxes[0], gt.labels[0], strict=True):  # gt boxes are proposals
        hit = (positives == box).all(1)
        assert hit.any() and (classes[classes > 0][hit] == label + 1).all()
    assert box_targets.shape == (int((classes > 0).sum()), 4)


def test_no_proposals_and_no_ground_truth() -> None:
    _, ours = _pair(sample_all=False)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    no_gt = pad_targets([_targets()[1], _targets()[1]])
    ours.train()
    losses = ours.loss(_features(), empty, IMAGE, no_gt)
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in losses.values())
    detections = _detect(ours.eval(), _features(), empty)
    assert [len(d["boxes"]) for d in detections] == [0, 0]
    assert detections[0]["labels"].dtype == torch.int64
