"""Task-aligned assignment against a per-image, per-object loop written from the rule itself
(centre prior, alignment s^alpha u^beta, top-k per object, one object per point by IoU,
soft targets t / max t * max u), with torchvision's box_iou as the IoU."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from detkit.matching import AnchorPoints, TaskAlignedAssigner, assign_task_aligned
from detkit.structures import pad_targets

SIZE = (64, 96)


def _oracle(scores, pred_boxes, points, targets, topk, alpha, beta):
    """Plain loops over images, objects and points."""
    batch, num_points, num_classes = scores.shape
    matched = torch.zeros(batch, num_points, dtype=torch.int64)
    positive = torch.zeros(batch, num_points, dtype=torch.bool)
    soft = torch.zeros(batch, num_points, num_classes)
    for b, target in enumerate(targets):
        chosen_by = [[] for _ in range(num_points)]  # per point: (gt, iou, alignment)
        for j, (box, label) in enumerate(zip(target["boxes"], target["labels"], strict=True)):
            x1, y1, x2, y2 = box.tolist()
            if x2 <= x1 or y2 <= y1:
                continue
            ranked = []
            for p in range(num_points):
                px, py = points[p].tolist()
                if x1 < px < x2 and y1 < py < y2:
                    iou = float(box_iou(box[None], pred_boxes[b, p][None]))
                    align = float(scores[b, p, label]) ** alpha * iou**beta
                    ranked.append((align, p, iou))
            ranked.sort(reverse=True)
            for align, p, iou in ranked[:topk]:
                chosen_by[p].append((j, iou, align))
        owners = {}  # point -> (gt, iou, alignment) of the object it keeps
        for p, chosen in enumerate(chosen_by):
            if chosen:
                best_iou = max(iou for _, iou, _ in chosen)
                owners[p] = next(c for c in chosen if c[1] == best_iou)  # lowest index on ties
        for p, (j, _, align) in owners.items():
            mine = [o for o in owners.values() if o[0] == j]
            max_align = max(o[2] for o in mine)
            max_iou = max(o[1] for o in mine)
            matched[b, p], positive[b, p] = j, True
            soft[b, p, target["labels"][j]] = align / max_align * max_iou
    return matched, positive, soft


def _scene(seed: int, num_classes: int = 4):
    """Three images: overlapping objects (points inside several), a degenerate box, an image
    without objects; predictions centred on each point, so every candidate has IoU > 0 and
    no two alignments tie."""
    g = torch.Generator().manual_seed(seed)
    grid = AnchorPoints((8, 16, 32))(SIZE)
    num_points = len(grid.points)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([70.0, 40.0])
        wh = 6 + torch.rand(n, 2, generator=g) * 40
        return torch.cat((xy, xy + wh), dim=1)

    first = boxes(4)
    first[1] = first[0] + torch.tensor([3.0, 2.0, 5.0, 4.0])  # heavy overlap with object 0
    second = boxes(2)
    second[1, 2] = second[1, 0]  # zero width: skipped
    targets = [
        {"boxes": first, "labels": torch.randint(0, num_classes, (4,), generator=g)},
        {"boxes": second, "labels": torch.randint(0, num_classes, (2,), generator=g)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    half = 4 + torch.rand(3, num_points, 2, generator=g) * 20
    centre = grid.points + (torch.rand(3, num_points, 2, generator=g) - 0.5)
    pred_boxes = torch.cat((centre - half, centre + half), dim=-1)
    scores = torch.rand(3, num_points, num_classes, generator=g) * 0.98 + 0.01
    return scores, pred_boxes, grid.points, targets


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("topk, alpha, beta", [(10, 0.5, 6.0), (3, 1.0, 2.0), (40, 0.5, 6.0)])
def test_batched_assignment_equals_per_image_loop(seed, topk, alpha, beta):
    scores, pred_boxes, points, targets = _scene(seed)
    got = assign_task_aligned(scores, pred_boxes, points, pad_targets(targets), topk, alpha, beta)
    matched, positive, soft = _oracle(scores, pred_boxes, points, targets, topk, alpha, beta)
    assert positive.any() and torch.equal(got.pos_mask, positive)
    assert torch.equal(got.matched_gt, matched)
    torch.testing.assert_close(got.target_scores, soft, rtol=1e-4, atol=1e-6)
    # the scene exercises what it should: a point chosen by two objects, the degenerate box
    # and the empty image get nothing
    assert not positive[2].any() and not (matched[1][positive[1]] == 1).any()
    assert (got.target_scores.amax(dim=(1, 2))[:2] > 0).all()


def test_points_chosen_by_two_objects_keep_the_one_they_overlap_most():
    points = torch.tensor([[10.0, 10.0], [30.0, 10.0]])
    # both points lie inside both objects; object 1 fits the predictions at point 1 better
    gt = pad_targets(
        [{"boxes": torch.tensor([[0.0, 0.0, 40.0, 20.0], [5.0, 2.0, 38.0, 19.0]]),
          "labels": torch.tensor([0, 1])}]
    )  # fmt: skip
    pred_boxes = torch.tensor([[[0.0, 0.0, 40.0, 20.0], [5.0, 2.0, 38.0, 19.0]]])
    scores = torch.full((1, 2, 2), 0.5)
    got = TaskAlignedAssigner(topk=10)(scores, pred_boxes, points, gt)
    assert got.pos_mask.all() and got.matched_gt.tolist() == [[0, 1]]
    # each object's only point aims at the object's best IoU, here 1: one-hot targets
    torch.testing.assert_close(got.target_scores, torch.eye(2)[None], rtol=0, atol=1e-6)


def test_no_ground_truth_and_bad_arguments():
    scores, pred_boxes = torch.rand(2, 5, 3), torch.rand(2, 5, 4)
    points = torch.rand(5, 2)
    empty = pad_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()}] * 2)
    got = assign_task_aligned(scores, pred_boxes, points, empty)
    assert not got.pos_mask.any() and not got.target_scores.any()
    assert got.target_scores.shape == (2, 5, 3)
    with pytest.raises(ValueError, match="disagree"):
        assign_task_aligned(scores, pred_boxes, torch.rand(4, 2), empty)
    with pytest.raises(ValueError, match="topk"):
        TaskAlignedAssigner(topk=0)
