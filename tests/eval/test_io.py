import copy
import json

import numpy as np
import pytest

from detkit.eval import evaluate_coco, evaluate_voc
from detkit.eval.backends import run_backend

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
        (_det(bbox=[0, 0, float("nan"), 3]), "NaN/inf or negative width"),
        (_det(bbox=[0, 0, -2, 3]), "negative width"),
        (_det(bbox=[0, 0, 3]), r"4 numbers \[x, y, w, h\]"),
        (_det(score=float("nan")), "non-finite score"),
        (_det(score=float("inf")), "non-finite score"),
        (_det(score="high"), "entry 0 has score 'high', which is not a number"),
        (_det(image_id=None), "entry 0 has image_id None"),
        (_det(category_id=1.5), "category_id 1.5, which is not an integer"),
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
    with pytest.raises(ValueError, match="ground truth annotations: entry 1 .*negative width"):
        evaluate_coco(gt, [])


def _broken(edit):
    gt = copy.deepcopy(GT)
    gt["annotations"].insert(0, dict(GT["annotations"][0], id=5, image_id=7))  # an orphan
    edit(gt)
    return gt


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda gt: gt["categories"][1].pop("id"), "categories: entry 1 has no 'id' field"),
        (lambda gt: gt["categories"][0].update(id="1"), "categories: entry 0 has id '1'"),
        (lambda gt: gt.update(categories=None), "'categories' must be a list"),
        (lambda gt: gt.update(categories=[]), "'categories' is empty"),
        (lambda gt: gt.update(images=None), "'images' must be a list"),
        (lambda gt: gt.update(annotations=None), "'annotations' must be a list"),
        (lambda gt: gt["images"][1].update(id=None), "images: entry 1 has id None"),
        (lambda gt: gt["images"][1].update(id="2"), "images: entry 1 has id '2'"),
        # the entry's index in the file's list, though the orphan before it is left out
        (lambda gt: gt["annotations"][1].update(area=None), "annotations: entry 1 has area None"),
        (lambda gt: gt["annotations"][1].update(area="big"), "entry 1 has area 'big'"),
        (lambda gt: gt["annotations"][1].update(category_id=3.7), "category_id 3.7"),
        (lambda gt: gt["annotations"][1].update(image_id=None), "entry 1 has image_id None"),
        (lambda gt: gt["annotations"][1].pop("area"), "entry 1 has no 'area' field"),
    ],
)
def test_malformed_ground_truth_is_one_error_naming_the_entry(edit, message):
    with pytest.raises(ValueError, match=message):
        evaluate_coco(_broken(edit), [])


def test_files_in_other_encodings(tmp_path):
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"images": [], "categories": [{"id": 1, "name": "caf\xe9"}]}')
    with pytest.raises(ValueError, match=r"latin.json is not UTF-8 text"):
        evaluate_coco(latin, [])
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GT).encode())
    results = tmp_path / "empty.json"
    results.write_text("[]")
    assert evaluate_coco(bom, results)["AP"] == 0.0
    # the reference tool is handed the data detkit read: a BOM and an empty results file
    assert run_backend("pycocotools", bom, results)["stats"][1] in (0.0, -1.0)


def test_detections_of_unlisted_categories_are_left_out_with_a_count(reference_eval):
    gt = copy.deepcopy(GT)
    gt["annotations"].append(dict(GT["annotations"][0], id=2, image_id=2, bbox=[5, 5, 10, 10]))
    dets = _det() + _det(image_id=2, category_id=90, score=0.9) + _det(image_id=2, score=0.4)
    with pytest.warns(UserWarning, match=r"left out 1 of 3 detections .*\(90\)"):
        ours = evaluate_coco(gt, dets)["stats"]
    np.testing.assert_array_equal(ours, reference_eval(gt, dets).stats)


def test_orphan_annotations_are_left_out_with_a_count(reference_eval):
    gt = _broken(lambda gt: None)
    with pytest.warns(UserWarning, match="left out 1 of 2 annotations"):
        ours = evaluate_coco(gt, _det())["stats"]
    np.testing.assert_array_equal(ours, reference_eval(gt, _det()).stats)


@pytest.mark.parametrize(
    "flags", [{"difficult": 1}, {"ignore": 1}, {"ignore": 0, "iscrowd": 1}], ids=str
)
def test_any_difficult_flag_marks_a_voc_difficult_object(flags):
    # mmdetection's VOC-to-COCO converter writes difficult objects as ignore 0, iscrowd 1
    gt = copy.deepcopy(GT)
    gt["annotations"].append(
        dict(GT["annotations"][0], id=2, image_id=2, bbox=[20, 20, 10, 10], **flags)
    )
    for method in ("11point", "area"):
        assert evaluate_voc(gt, _det(), method=method)["mAP"] == pytest.approx(1.0)
