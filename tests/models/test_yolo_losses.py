"""YOLO losses against per-image loop oracles written from the papers (target building
included), plus loss decrease on a fixed batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, complete_box_iou_loss, generalized_box_iou_loss

from detkit.matching import (
    AnchorPoints,
    DistanceCoder,
    TaskAlignedAssigner,
    YOLOPriors,
    YOLOv1Coder,
    YOLOv1Grid,
    YOLOv3Coder,
    assign_task_aligned,
)
from detkit.models.heads.yolo import YOLOv1Output, YOLOv3Output, YOLOv8Output
from detkit.models.yolo_losses import (
    YOLOv1Loss,
    YOLOv3Loss,
    YOLOv8Loss,
    distribution_focal_loss,
)
from detkit.structures import pad_targets

pytestmark = pytest.mark.usefixtures("one_thread")


IMAGE = (64, 64)
ANCHORS = (
    ((6, 6), (10, 14), (14, 10)),
    ((16, 16), (20, 28), (28, 20)),
    ((36, 36), (50, 40), (60, 60)),
)


def _v1_loss(loss, raw: YOLOv1Output, gt, s: int):
    """The loss called as the detector calls it: with the cells and the coder."""
    return loss(raw, YOLOv1Grid(s)(IMAGE), YOLOv1Coder(), gt)


def _v3_loss(loss, raw: torch.Tensor, gt):
    """``raw [B, P, 5 + C]`` as YOLOv3Head's outputs, with the grid and the coder."""
    grid = YOLOPriors(ANCHORS, (8, 16, 32))(IMAGE)
    return loss(YOLOv3Output(raw[..., :4], raw[..., 4], raw[..., 5:]), grid, YOLOv3Coder(), gt)


def _target(boxes, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _v1_oracle(raw: YOLOv1Output, targets, s: int, num_classes: int, image_size):
    """YOLOv1 loss (paper eq. 3) one image and one cell at a time."""
    h_img, w_img = image_size
    total = {"box_regression": 0.0, "objectness": 0.0, "classification": 0.0}
    for b, t in enumerate(targets):
        owner = {}
        for j, (x1, y1, x2, y2) in enumerate(t["boxes"].tolist()):
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            owner[(min(int(cy * s / h_img), s - 1), min(int(cx * s / w_img), s - 1))] = j
        for r in range(s):
            for c in range(s):
                conf = raw.confidence[b, r, c]
                if (r, c) not in owner:
                    total["objectness"] += 0.5 * float(conf.square().sum())
                    continue
                j = owner[(r, c)]
                x1, y1, x2, y2 = t["boxes"][j].tolist()
                gw, gh = x2 - x1, y2 - y1
                code_t = torch.tensor(
                    [(x1 + gw / 2) * s / w_img - c, (y1 + gh / 2) * s / h_img - r,
                     math.sqrt(gw / w_img), math.sqrt(gh / h_img)]
                )  # fmt: skip
                codes = raw.box[b, r, c]
                pcx, pcy = (codes[:, 0] + c) * w_img / s, (codes[:, 1] + r) * h_img / s
                pw, ph = codes[:, 2] ** 2 * w_img, codes[:, 3] ** 2 * h_img
                pred = torch.stack((pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2), 1)
                ious = box_iou(pred, t["boxes"][j : j + 1])[:, 0]
                best = int(ious.argmax())
                total["box_regression"] += 5.0 * float((codes[best] - code_t).square().sum())
                for k in range(len(conf)):
                    if k == best:
                        total["objectness"] += float((conf[k] - ious[k]) ** 2)
                    else:
                        total["objectness"] += 0.5 * float(conf[k] ** 2)
                one_hot = F.one_hot(t["labels"][j], num_classes).float()
                total["classification"] += float((raw.class_prob[b, r, c] - one_hot).square().sum())
    return {k: v / len(targets) for k, v in total.items()}


def _v1_raw(batch, s, k, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return YOLOv1Output(
        torch.rand(batch, s, s, k, 4, generator=g) * 0.8 + 0.1,
        torch.rand(batch, s, s, k, generator=g),
        torch.randn(batch, s, s, c, generator=g).softmax(-1),
    )


def test_yolov1_loss_equals_paper_oracle_with_shared_cell():
    s, k, c = 4, 2, 3
    targets = [
        # two centres in cell (row 0, col 0): the later box owns it; one more in cell (2, 3)
        _target([[2, 2, 12, 14], [4, 1, 14, 10], [50, 34, 62, 46]], [0, 2, 1]),
        _target([], []),
    ]
    raw = _v1_raw(2, s, k, c)
    got = _v1_loss(YOLOv1Loss(), raw, pad_targets(targets), s)
    want = _v1_oracle(raw, targets, s, c, IMAGE)
    for name in want:
        assert float(got[name]) == pytest.approx(want[name], rel=1e-5, abs=1e-6), name


def test_yolov1_responsible_predictor_is_highest_iou():
    # Predictor 1 sits exactly on the object, predictor 0 far off: only predictor 1 is pulled
    # towards the box, and its confidence target is its IoU (1).
    s = 2
    targets = [_target([[8, 8, 24, 24]], [1])]  # centre (16, 16): cell (0, 0), 32-px cells
    codes = torch.full((1, s, s, 2, 4), 0.5)
    codes[0, 0, 0, 1] = torch.tensor([0.5, 0.5, 0.5, 0.5])  # (16, 16) 16x16: the gt box
    codes[0, 0, 0, 0] = torch.tensor([0.1, 0.1, 0.1, 0.1])
    conf = torch.zeros(1, s, s, 2)
    conf[0, 0, 0, 1] = 1.0
    prob = torch.tensor([0.0, 1.0]).expand(1, s, s, 2)
    losses = _v1_loss(YOLOv1Loss(), YOLOv1Output(codes, conf, prob), pad_targets(targets), s)
    assert float(losses["box_regression"]) == pytest.approx(0.0, abs=1e-10)
    assert float(losses["objectness"]) == pytest.approx(0.0, abs=1e-10)
    assert float(losses["classification"]) == pytest.approx(0.0, abs=1e-10)


def _v3_oracle(raw, targets, anchors, strides, image_size, num_classes, box_loss, ignore):
    """YOLOv3 loss one image and one ground truth at a time (independent decode and indexing)."""
    h_img, w_img = image_size
    layout = []  # (level, row, col, anchor) of each prior, level/row/col/anchor order
    for level, stride in enumerate(strides):
        gh, gw = math.ceil(h_img / stride), math.ceil(w_img / stride)
        layout += [(level, r, c, a) for r in range(gh) for c in range(gw) for a in range(3)]
    flat = [(lv, a, w, h) for lv, sc in enumerate(anchors) for a, (w, h) in enumerate(sc)]
    totals = {"box_regression": 0.0, "objectness": 0.0, "classification": 0.0}
    num_pos = 0
    for b, t in enumerate(targets):
        pred = []
        for p, (lv, r, c, a) in enumerate(layout):
            tx, ty, tw, th = raw[b, p, :4].tolist()
            aw, ah = anchors[lv][a]
            cx, cy = (
                (torch.sigmoid(torch.tensor(tx)) + c) * strides[lv],
                (torch.sigmoid(torch.tensor(ty)) + r) * strides[lv],
            )
            pw, ph = aw * math.exp(tw), ah * math.exp(th)
            pred.append([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2])
        pred = torch.tensor(pred)
        positives = {}
        for j, (x1, y1, x2, y2) in enumerate(t["boxes"].tolist()):
            gw_, gh_ = x2 - x1, y2 - y1
            shape_iou = [
                min(gw_, w) * min(gh_, h) / (gw_ * gh_ + w * h - min(gw_, w) * min(gh_, h))
                for _, _, w, h in flat
            ]
            lv, a, _, _ = flat[max(range(len(flat)), key=lambda i: (shape_iou[i], -i))]
            col, row = int((x1 + gw_ / 2) // strides[lv]), int((y1 + gh_ / 2) // strides[lv])
            positives[layout.index((lv, row, col, a))] = j
        best_iou = (
            box_iou(pred, t["boxes"]).max(1).values if len(t["boxes"]) else torch.zeros(len(pred))
        )
        for p in range(len(layout)):
            if p in positives:
                target = 1.0
            elif best_iou[p] > ignore:
                continue
            else:
                target = 0.0
            totals["objectness"] += float(
                F.binary_cross_entropy_with_logits(raw[b, p, 4], torch.tensor(target))
            )
        for p, j in positives.items():
            one_hot = F.one_hot(t["labels"][j], num_classes).float()
            cls = F.binary_cross_entropy_with_logits(raw[b, p, 5:], one_hot, reduction="sum")
            totals["classification"] += float(cls)
            fn = complete_box_iou_loss if box_loss == "ciou" else generalized_box_iou_loss
            totals["box_regression"] += float(fn(pred[p], t["boxes"][j]))
        num_pos += len(positives)
    return {k: v / max(num_pos, 1) for k, v in totals.items()}, num_pos


@pytest.mark.parametrize("box_loss", ["ciou", "giou"])
def test_yolov3_loss_equals_loop_oracle(box_loss):
    c = 4
    targets = [
        # Two objects in cell (1, 1) of stride 8 with different best anchors: both positive.
        # The 40x40 box also overlaps predictions of neighbouring priors (ignore rule).
        _target([[9, 9, 15, 15], [8, 5, 18, 19], [10, 10, 50, 50], [30, 40, 58, 60]], [0, 1, 2, 3]),
        _target([[20, 20, 36, 36], [21, 21, 35, 35]], [3, 0]),  # same slot: the later wins
        _target([], []),
    ]
    num_priors = sum(math.ceil(64 / s) ** 2 * 3 for s in (8, 16, 32))
    raw = torch.randn(3, num_priors, 5 + c, generator=torch.Generator().manual_seed(1)) * 0.5
    loss = YOLOv3Loss(box_loss=box_loss, ignore_threshold=0.5)
    got = _v3_loss(loss, raw, pad_targets(targets))
    want, num_pos = _v3_oracle(raw, targets, ANCHORS, (8, 16, 32), IMAGE, c, box_loss, 0.5)
    assert num_pos == 5
    for name in want:
        assert float(got[name]) == pytest.approx(want[name], rel=1e-4), name


def test_yolov3_ignored_predictions_get_no_objectness_loss():
    gt = pad_targets([_target([[18, 18, 54, 54]], [1])])  # 36x36 centred at (36, 36)
    num_priors = sum(math.ceil(64 / s) ** 2 * 3 for s in (8, 16, 32))
    grid = YOLOPriors(ANCHORS, (8, 16, 32))(IMAGE)

    def prior(level, anchor, cell):
        match = (grid.level == level) & (grid.anchor_index == anchor)
        return int((match & (grid.grid_xy == torch.tensor(cell)).all(1)).nonzero())

    # Best shape: the 36x36 anchor of stride 32, cell (1, 1). A stride-16 prediction decoded
    # exactly onto the box is a near miss: not positive, IoU 1 > 0.5, so ignored.
    positive, near_miss, negative = prior(2, 0, (1, 1)), prior(1, 0, (2, 2)), prior(0, 0, (0, 0))
    raw = torch.zeros(1, num_priors, 7)
    raw[0, near_miss, :4] = torch.tensor(
        [math.log(0.25 / 0.75), math.log(0.25 / 0.75), math.log(36 / 16), math.log(36 / 16)]
    )
    decoded = YOLOv3Coder().decode(grid, raw[..., :4])[0]
    assert float(box_iou(decoded[near_miss : near_miss + 1], gt.boxes[0])) == pytest.approx(1.0)
    loss = YOLOv3Loss(ignore_threshold=0.5)
    base = _v3_loss(loss, raw, gt)["objectness"]
    confident = raw.clone()
    confident[0, near_miss, 4] = 10.0  # a confident near miss is not punished
    assert float(_v3_loss(loss, confident, gt)["objectness"]) == pytest.approx(float(base))
    confident = raw.clone()
    confident[0, negative, 4] = 10.0  # a confident empty prediction is
    assert float(_v3_loss(loss, confident, gt)["objectness"]) > float(base) + 5
    confident = raw.clone()
    confident[0, positive, 4] = 10.0  # and the positive is pulled up
    assert float(_v3_loss(loss, confident, gt)["objectness"]) < float(base) - 0.5


def test_yolov3_offsets_loss_is_zero_gradient_at_exact_targets():
    gt = pad_targets([_target([[12, 12, 28, 28]], [0])])  # 16x16 centred at (20, 20)
    num_priors = sum(math.ceil(64 / s) ** 2 * 3 for s in (8, 16, 32))
    grid = YOLOPriors(ANCHORS, (8, 16, 32))(IMAGE)
    positive = int(
        ((grid.level == 1) & (grid.anchor_index == 0) & (grid.grid_xy == 1).all(1)).nonzero()
    )
    raw = torch.zeros(1, num_priors, 7)
    # (20 / 16 - 1) = 0.25 = sigmoid(t) -> t = logit(0.25); size equals the anchor -> t_w = 0
    raw[0, positive, :2] = math.log(0.25 / 0.75)
    raw.requires_grad_(True)
    box = _v3_loss(YOLOv3Loss(box_loss="offsets"), raw, gt)["box_regression"]
    box.backward()
    assert raw.grad[0, positive, :4].abs().max() < 1e-6


def test_empty_batch_and_bad_arguments():
    num_priors = sum(math.ceil(64 / s) ** 2 * 3 for s in (8, 16, 32))
    raw = torch.zeros(2, num_priors, 7)
    losses = _v3_loss(YOLOv3Loss(), raw, pad_targets([_target([], []), _target([], [])]))
    assert float(losses["box_regression"]) == 0.0 and float(losses["classification"]) == 0.0
    # every prior is a negative at p = 0.5: BCE log(2) each, normalised by max(num_pos, 1)
    assert float(losses["objectness"]) == pytest.approx(2 * num_priors * math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="box_loss"):
        YOLOv3Loss(box_loss="l1")
    with pytest.raises(ValueError, match="ignore_threshold"):
        YOLOv3Loss(ignore_threshold=0.0)


@pytest.mark.parametrize("version", ["v1", "v3", "v8"])
def test_loss_decreases_on_a_fixed_batch(version):
    from detkit.models.backbones.darknet import CSPDarknet
    from detkit.models.detectors.yolo import yolov1, yolov3, yolov8

    torch.manual_seed(0)
    if version == "v1":
        backbone = CSPDarknet((8, 8, 16, 16, 32), out_stages=(4,))
        model = yolov1(3, 64, backbone=backbone, grid_size=2, downsample=False)
    elif version == "v8":
        model = yolov8(3, 64, backbone=CSPDarknet((8, 8, 16, 16, 32)))
    else:
        model = yolov3(3, 64, backbone=CSPDarknet((8, 8, 16, 16, 32)), priors=YOLOPriors(ANCHORS))
    images = torch.rand(2, 3, 64, 64)
    targets = [
        _target([[4, 6, 30, 40], [34, 30, 60, 60]], [0, 2]),
        _target([[10, 10, 50, 44]], [1]),
    ]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3 if version == "v1" else 1e-2)
    history = []
    for _ in range(20):
        loss = model(images, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert history[-1] < 0.3 * history[0], history


def _v8_oracle(out: YOLOv8Output, targets, points, strides, assign):
    """YOLOv8 loss one image and one positive point at a time, on the given assignment:
    expectation decoding by hand, torchvision's CIoU loss, the DFL formula of the paper
    (-((y_r - y) log S_l + (y - y_l) log S_r)), element-wise BCE."""
    reg_max = out.box.shape[-1]
    totals = {"classification": 0.0, "box_regression": 0.0, "distribution_focal": 0.0}
    norm = max(float(assign.target_scores.sum()), 1.0)
    clamped = 0
    for b, t in enumerate(targets):
        totals["classification"] += float(
            F.binary_cross_entropy_with_logits(
                out.class_logits[b], assign.target_scores[b], reduction="sum"
            )
        )
        for p in assign.pos_mask[b].nonzero().flatten().tolist():
            weight = float(assign.target_scores[b, p].sum())
            gt_box = t["boxes"][int(assign.matched_gt[b, p])]
            (px, py), stride = points[p].tolist(), float(strides[p])
            sides = [float((out.box[b, p, k].softmax(-1) * torch.arange(reg_max)).sum())
                     for k in range(4)]  # fmt: skip
            pred = torch.tensor([px - sides[0] * stride, py - sides[1] * stride,
                                 px + sides[2] * stride, py + sides[3] * stride])  # fmt: skip
            ciou = float(complete_box_iou_loss(pred, gt_box))
            totals["box_regression"] += 7.5 * weight * ciou
            x1, y1, x2, y2 = gt_box.tolist()
            dfl = 0.0
            for k, target in enumerate([(px - x1) / stride, (py - y1) / stride,
                                        (x2 - px) / stride, (y2 - py) / stride]):  # fmt: skip
                clamped += target > reg_max - 1.01
                y = min(max(target, 0.0), reg_max - 1.01)
                left = int(y)
                log_s = out.box[b, p, k].log_softmax(-1)
                dfl -= (left + 1 - y) * float(log_s[left]) + (y - left) * float(log_s[left + 1])
            totals["distribution_focal"] += 1.5 * weight * dfl / 4
    totals["classification"] *= 0.5
    return {k: v / norm for k, v in totals.items()}, clamped


def test_yolov8_loss_equals_loop_oracle():
    c, reg_max = 4, 4  # sides reach 3 strides: larger objects get clamped targets
    grid = AnchorPoints((8, 16, 32))(IMAGE)
    targets = [
        _target([[9, 9, 25, 31], [12, 8, 30, 30], [30, 36, 62, 60]], [0, 1, 3]),  # overlapping
        _target([[2, 40, 60, 63]], [2]),
        _target([], []),
    ]
    g = torch.Generator().manual_seed(3)
    out = YOLOv8Output(
        torch.randn(3, len(grid.points), 4, reg_max, generator=g),
        torch.randn(3, len(grid.points), c, generator=g),
    )
    gt = pad_targets(targets)
    coder = DistanceCoder(reg_max)
    got = YOLOv8Loss(TaskAlignedAssigner(topk=5))(out, grid, coder, gt)
    boxes = coder.decode(grid, out.box)
    assign = assign_task_aligned(out.class_logits.sigmoid(), boxes, grid.points, gt, topk=5)
    assert int(assign.pos_mask.sum()) > 10
    want, clamped = _v8_oracle(out, targets, grid.points, grid.stride, assign)
    assert clamped > 0 and set(got) == set(want)
    for name in want:
        assert float(got[name]) == pytest.approx(want[name], rel=1e-4), name


def test_distribution_focal_loss_is_stationary_at_the_two_bin_distribution():
    target = torch.tensor([0.0, 2.25, 6.5, 6.99])
    mixture = torch.zeros(4, 8)
    left = target.long()
    mixture[torch.arange(4), left] = 1 - (target - left)
    mixture[torch.arange(4), left + 1] += target - left
    logits = mixture.clamp(min=1e-12).log().requires_grad_(True)
    distribution_focal_loss(logits, target).sum().backward()
    assert logits.grad.abs().max() < 1e-6
    # ... where it is the entropy of that mixture (0 for an integer target)
    loss = distribution_focal_loss(logits.detach(), target)
    assert float(loss[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(loss[1]) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_yolov8_loss_without_objects_is_background_only():
    grid = AnchorPoints((8, 16, 32))(IMAGE)
    out = YOLOv8Output(torch.zeros(2, len(grid.points), 4, 16), torch.zeros(2, len(grid.points), 3))
    losses = YOLOv8Loss()(out, grid, DistanceCoder(), pad_targets([_target([], [])] * 2))
    assert float(losses["box_regression"]) == 0.0 and float(losses["distribution_focal"]) == 0.0
    # every class of every point is a negative at p = 0.5, weighted 0.5, normalised by 1
    expected = 0.5 * 2 * len(grid.points) * 3 * math.log(2)
    assert float(losses["classification"]) == pytest.approx(expected, rel=1e-5)
