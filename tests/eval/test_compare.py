"""Detection matching used by the export check, on hand-made detections."""

import torch

from detkit.eval.compare import compare_detections


def dets(boxes, scores, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


A = [[0, 0, 10, 10], [5, 5, 20, 30], [40, 40, 60, 50]]


def test_permuted_equal_detections_match_exactly():
    want = dets(A, [0.9, 0.8, 0.5], [1, 2, 1])
    got = dets([A[2], A[0], A[1]], [0.5, 0.9, 0.8], [1, 1, 2])
    result = compare_detections([want], [got])
    assert (result.matched, result.unmatched, result.max_box_diff, result.max_score_diff) == (
        3, 0, 0.0, 0.0,
    )  # fmt: skip
    assert result.ok(0.0)


def test_differences_are_measured_after_matching():
    want = dets(A, [0.9, 0.8, 0.5], [1, 2, 1])
    got = dets([[0, 0, 10, 10.5], A[1], A[2]], [0.9, 0.8, 0.5003], [1, 2, 1])
    result = compare_detections([want], [got])
    assert result.matched == 3
    assert result.max_box_diff == 0.5
    assert abs(result.max_score_diff - 0.0003) < 1e-6
    assert not result.ok(1e-3) and result.ok(0.5)


def test_a_different_label_is_a_disagreement():
    result = compare_detections([dets(A[:1], [0.9], [1])], [dets(A[:1], [0.9], [2])])
    assert result.matched == 0 and result.unmatched == 2 and not result.ok(1.0)


def test_missing_detections_are_borderline_only_at_a_cut():
    want = dets(A, [0.9, 0.8, 0.05], [1, 2, 1])
    got = dets(A[:2], [0.9, 0.8], [1, 2])
    near_threshold = compare_detections([want], [got], 1e-3, score_threshold=0.0501)
    assert near_threshold.borderline == 1 and near_threshold.unmatched == 0
    far = compare_detections([want], [got], 1e-3, score_threshold=0.01)
    assert far.unmatched == 1 and not far.ok(1.0)
    # a full list (3 == max_detections) cut at its last score
    full = compare_detections([want], [got], 1e-3, max_detections=3)
    assert full.borderline == 1


def test_empty_images_agree():
    empty = dets([], [], [])
    result = compare_detections([empty, empty], [empty, empty])
    assert result.images == 2 and result.matched == 0 and result.ok(0.0)
