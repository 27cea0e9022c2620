import numpy as np
import pytest

from detkit.eval.coco import coco_from_arrays
from detkit.eval.curves import at_threshold, best_f1, class_curves, confusion_matrix
from detkit.eval.io import load_ground_truth, load_predictions

GT = {
    "images": [{"id": 1}, {"id": 2}],
    "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 0, 10, 10],
            "area": 100,
            "iscrowd": 0,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 2,
            "bbox": [50, 50, 10, 10],
            "area": 100,
            "iscrowd": 0,
        },
        {
            "id": 3,
            "image_id": 2,
            "category_id": 1,
            "bbox": [0, 0, 20, 20],
            "area": 400,
            "iscrowd": 0,
        },
        {
            "id": 4,
            "image_id": 2,
            "category_id": 2,
            "bbox": [100, 100, 30, 30],
            "area": 900,
            "iscrowd": 1,
        },
    ],
}


def _det(image, cat, bbox, score):
    return {"image_id": image, "category_id": cat, "bbox": bbox, "score": score}


DETS = [
    _det(1, 1, [0, 0, 10, 10], 0.9),  # cat TP
    _det(1, 1, [50, 50, 10, 10], 0.8),  # says cat on the dog: confusion (dog -> cat)
    _det(2, 2, [0, 0, 20, 20], 0.7),  # says dog on the cat of image 2
    _det(2, 1, [300, 300, 5, 5], 0.6),  # cat on background
    _det(2, 2, [110, 110, 5, 5], 0.95),  # inside the dog crowd region: ignored
    _det(1, 1, [0, 0, 10, 10], 0.1),  # low-score duplicate, below the 0.25 threshold
]


def _arrays():
    truth = load_ground_truth(GT)
    return truth, load_predictions(DETS, truth)


def test_confusion_matrix_by_hand():
    truth, pred = _arrays()
    matrix = confusion_matrix(truth, pred, iou_threshold=0.5, score_threshold=0.25)
    # rows true (cat, dog, background), columns predicted
    expected = np.array([[1, 1, 0], [1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(matrix, expected)
    with_low = confusion_matrix(truth, pred, score_threshold=0.0)
    assert with_low[2, 0] == 2  # the duplicate is one more false cat


def test_curves_f1_and_threshold():
    truth, pred = _arrays()
    match = coco_from_arrays(truth, pred, keep_match=True)["match"]
    cat, dog = class_curves(match)
    # cat, by score: TP(.9), FP(.8), FP(.6), FP(.1 duplicate); 2 cats in the ground truth
    np.testing.assert_allclose(cat["scores"], [0.9, 0.8, 0.6, 0.1])
    np.testing.assert_allclose(cat["precision"], [1, 1 / 2, 1 / 3, 1 / 4])
    np.testing.assert_allclose(cat["recall"], [0.5, 0.5, 0.5, 0.5])
    best = best_f1(cat)
    assert best["threshold"] == 0.9 and best["f1"] == pytest.approx(2 / 3)
    assert at_threshold(cat, 0.7) == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert at_threshold(cat, 0.95) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # dog: the crowd-region detection is neither TP nor FP; one FP remains, no dog found
    assert dog["num_gt"] == 1
    np.testing.assert_allclose(dog["precision"], [0.0])
    assert best_f1(dog)["f1"] == 0.0


def test_curves_agree_with_coco_precision(coco_case):
    gt, dets = coco_case(5)
    rng = np.random.default_rng(0)
    for det in dets:  # distinct scores: with ties the curves keep only whole tie groups
        det["score"] = float(rng.random())
    truth = load_ground_truth(gt)
    res = coco_from_arrays(truth, load_predictions(dets, truth), keep_match=True)
    curves = class_curves(res["match"])
    recall_points = np.linspace(0, 1, 101)
    for k, curve in enumerate(curves):
        if curve["num_gt"] == 0:
            continue
        # COCO's interpolated precision = envelope of this curve sampled at recall points
        env = np.maximum.accumulate(curve["precision"][::-1])[::-1]
        expect = [
            env[np.searchsorted(curve["recall"], r)] if r <= curve["recall"][-1] else 0
            for r in recall_points
        ]
        np.testing.assert_allclose(res["precision"][0, :, k, 0], expect, atol=1e-12)
