import pytest
import torch

from detkit.matching import (
    YOLOPriors,
    YOLOv1Grid,
    assign_yolov1,
    assign_yolov3,
    fit_anchors,
    fit_anchors_from_dataset,
)
from detkit.structures import pad_targets


def _priors():
    return YOLOPriors([[(10, 10), (20, 40)], [(60, 60)]], strides=[8, 16])


def test_yolo_priors_layout():
    priors = _priors()
    grid = priors((32, 48))  # grids 4x6 (2 anchors) and 2x3 (1 anchor)
    boxes = grid.boxes()
    assert boxes.shape == (4 * 6 * 2 + 2 * 3, 4)
    assert boxes[0].tolist() == [-1.0, -1.0, 9.0, 9.0]  # cell (0, 0), centre (4, 4), 10x10
    assert boxes[1].tolist() == [-6.0, -16.0, 14.0, 24.0]  # same cell, 20x40
    assert boxes[2].tolist() == [7.0, -1.0, 17.0, 9.0]  # next column
    assert grid.grid_xy[48].tolist() == [0.0, 0.0] and grid.stride[48] == 16
    assert grid.level.tolist().count(1) == 6


def test_fit_anchors_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[12.0, 10.0], [40.0, 90.0], [150.0, 60.0], [300.0, 320.0]])
    wh = torch.cat([c * (1 + 0.05 * torch.randn(200, 2, generator=g)) for c in centres])
    anchors = fit_anchors(wh, k=4, seed=1)
    torch.testing.assert_close(anchors, centres, rtol=0.03, atol=0)
    assert (anchors.prod(1).diff() > 0).all()  # sorted by area


def test_fit_anchors_rejects_too_few_boxes():
    with pytest.raises(ValueError, match="at least k=9"):
        fit_anchors(torch.rand(5, 2) + 1, k=9)


def test_fit_anchors_from_dataset_scales_boxes():
    class FakeDataset:
        def to_coco(self):
            images = [{"id": i, "width": 200, "height": 100} for i in range(40)]
            anns = [
                {"id": i, "image_id": i, "bbox": [0, 0, 20 if i % 2 else 100, 10], "iscrowd": 0}
                for i in range(40)
            ]
            anns.append({"id": 99, "image_id": 0, "bbox": [0, 0, 200, 100], "iscrowd": 1})
            return {"images": images, "annotations": anns}

    # letterboxed as YOLO's transforms do: 200x100 images fit 400x400 at one factor, 2
    anchors = fit_anchors_from_dataset(FakeDataset(), k=2, image_size=400)
    torch.testing.assert_close(anchors, torch.tensor([[40.0, 20.0], [200.0, 20.0]]))
    stretched = fit_anchors_from_dataset(FakeDataset(), k=2, image_size=400, letterbox=False)
    torch.testing.assert_close(stretched, torch.tensor([[40.0, 40.0], [200.0, 40.0]]))


def test_assign_yolov3_best_anchor_at_centre_cell():
    priors = _priors()
    targets = [
        # centre (20, 12): cell (col 2, row 1) of stride 8; shape 10x10 -> anchor 0
        # centre (24, 16) 60x60 -> level 1 cell (col 1, row 1)
        {"boxes": torch.tensor([[15.0, 7.0, 25.0, 17.0], [-6.0, -14.0, 54.0, 46.0]]),
         "labels": torch.tensor([0, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # fmt: skip
    res = assign_yolov3(pad_targets(targets), priors((32, 48)), ignore_threshold=0.5)
    first = (1 * 6 + 2) * 2 + 0
    second = 48 + 1 * 3 + 1
    assert res.pos_mask[0].nonzero().squeeze(1).tolist() == [first, second]
    assert res.matched_gt[0, first] == 0 and res.matched_gt[0, second] == 1
    assert not res.pos_mask[1].any() and res.neg_mask[1].all()
    # the prior next door (col 1, same 10x10 shape) overlaps gt 0 with IoU 1/3: stays negative;
    # nothing but the exact prior overlaps it above 0.5
    assert res.neg_mask[0, first - 2] and not res.ignore_mask[0, :48].any()
    assert (res.pos_mask ^ res.neg_mask ^ res.ignore_mask).all()


def test_assign_yolov3_ignore_uses_predictions_and_collisions():
    priors = _priors()
    box = torch.tensor([[15.0, 7.0, 25.0, 17.0]])
    targets = [{"boxes": torch.cat((box, box + 0.5, box * 0 + torch.tensor([14, 4, 26, 20]))),
                "labels": torch.tensor([0, 1, 2])}]  # fmt: skip
    preds = priors((32, 48)).boxes()[None].clone()
    preds[0, 0] = box[0] + 1.0  # a far-away prediction that lands on gt 0: ignored
    res = assign_yolov3(pad_targets(targets), priors((32, 48)), pred_boxes=preds)
    slot = (1 * 6 + 2) * 2
    # gts 0 and 1 share cell and anchor: the later one wins; gt 2 (12x16) too -> also anchor 0
    assert res.pos_mask[0].sum() == 1 and res.matched_gt[0, slot] == 2
    assert res.ignore_mask[0, 0] and not res.neg_mask[0, 0]


def test_assign_yolov1_responsible_predictor():
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [60.0, 0.0, 100.0, 40.0]]),
         "labels": torch.tensor([0, 1])},
    ]  # fmt: skip
    gt = pad_targets(targets)
    preds = torch.zeros(1, 4, 4, 2, 4)
    preds[0, 0, 0, 0] = torch.tensor([0.0, 0.0, 5.0, 5.0])  # poor
    preds[0, 0, 0, 1] = torch.tensor([10.0, 10.0, 30.0, 28.0])  # good
    cells = YOLOv1Grid(4)((100, 100))  # cells of 25 px
    res = assign_yolov1(gt, cells, pred_boxes=preds)
    assert res.obj_mask[0].nonzero().tolist() == [[0, 0], [0, 3]]
    assert res.matched_gt[0, 0, 3] == 1
    assert res.responsible[0, 0, 0].tolist() == [False, True]
    torch.testing.assert_close(res.pred_iou[0, 0, 0, 1], torch.tensor(0.9))
    assert res.responsible.sum() == 2  # predictors of empty cells are never responsible
    default = assign_yolov1(gt, cells)
    assert default.responsible[0, 0, 3].tolist() == [True, False]
