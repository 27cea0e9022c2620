import json

import pytest

from detkit.eval import evaluate_coco, evaluate_voc

GT = {
    "images": [{"id": 1}, {"id": 2}],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    "annotations": [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [0, 0, 10, 10],
            "area": 100,
            "iscrowd": 0,
        }
    ],
}


def _det(**kw):
    det = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}
    det.update(kw)
    return [det]


@pytest.mark.parametrize(
    ("det", "message"),
    [
        (_det(image_id=7), r"unknown image ids \[7\]"),
        (_det(category_id=9), r"unknown category ids \[9\]"),
        (_det(bbox=[0, 0, float("nan"), 3]), "NaN/inf or negative width"),
        (_det(bbox=[0, 0, -2, 3]), "negative width"),
        (_det(bbox=[0, 0, 3]), r"4 numbers \[x, y, w, h\]"),
        (_det(score=float("nan")), "non-finite score"),
        (_det(score=float("inf")), "non-finite score"),
        (_det(score="high"), "'score' must be a number"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}], "no 'score' field"),
        ({"image_id": 1}, "expected a list of detections"),
    ],
)
def test_bad_predictions_are_named(det, message):
    for evaluate in (evaluate_coco, evaluate_voc):
        with pytest.raises(ValueError, match=message):
            evaluate(GT, det)


def test_any_finite_score_is_accepted():
    # Scores are only ranked; logits or scores > 1 from other tools are fine.
    assert evaluate_coco(GT, _det(score=7.5))["AP50"] == pytest.approx(1.0)


def test_bad_files_name_the_file(tmp_path):
    broken = tmp_path / "results.json"
    broken.write_text('[{"image_id": 1,')
    with pytest.raises(ValueError, match=r"predictions file .*results.json is not valid JSON"):
        evaluate_coco(GT, broken)
    with pytest.raises(FileNotFoundError, match="ground truth file not found"):
        evaluate_coco(tmp_path / "missing.json", [])
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match=r"gt.json: expected a COCO dict with 'images'"):
        evaluate_coco(gt_file, [])


def test_bad_ground_truth():
    gt = json.loads(json.dumps(GT))
    gt["annotations"].append(dict(gt["annotations"][0]))
    with pytest.raises(ValueError, match="duplicate annotation ids"):
        evaluate_coco(gt, [])
    gt["annotations"][1]["id"] = 2
    gt["annotations"][1]["bbox"] = [0, 0, -1, 5]
    with pytest.raises(ValueError, match="ground truth: entry 1 .*negative width"):
        evaluate_coco(gt, [])
