import json

import numpy as np
import pytest

from detkit.eval import evaluate_coco
from detkit.eval.stats import STAT_NAMES


def _reference_per_class(evaluator) -> list[float]:
    precision = evaluator.eval["precision"]
    out = []
    for k in range(precision.shape[2]):
        s = precision[:, :, k, 0, -1]
        out.append(float(np.mean(s[s > -1])) if (s > -1).any() else -1.0)
    return out


@pytest.mark.filterwarnings("ignore:ground truth has an annotation with id 0")
@pytest.mark.parametrize("seed", range(12))
def test_matches_pycocotools_on_random_sets(seed, coco_case, reference_eval):
    gt, dets = coco_case(seed, crowd=0.15 if seed % 3 else 0.4)
    ours = evaluate_coco(gt, dets)
    ref = reference_eval(gt, dets)
    assert len(ours["stats"]) == 12
    np.testing.assert_allclose(ours["stats"], ref.stats, rtol=0, atol=1e-12)
    for name, value in zip(STAT_NAMES, ref.stats, strict=True):
        assert abs(ours[name] - value) <= 1e-12
    per_class = list(ours["per_class"].values())
    np.testing.assert_allclose(per_class, _reference_per_class(ref), rtol=0, atol=1e-12)
    assert per_class[-1] == -1.0  # the class with predictions only
    assert 0 < ours["AP50"] < 1  # the random sets are neither trivial nor hopeless


def test_crowd_iou_uses_detection_area(reference_eval):
    # A detection inside a huge crowd region: IoU(crowd) = inter / det area = 1 -> ignored,
    # so it is not a false positive and AP stays perfect.
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "a"}],
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
                "category_id": 1,
                "bbox": [100, 100, 500, 500],
                "area": 250000,
                "iscrowd": 1,
            },
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},
        {"image_id": 1, "category_id": 1, "bbox": [200, 200, 20, 20], "score": 0.9},
    ]
    ours = evaluate_coco(gt, dets)
    assert ours["AP"] == pytest.approx(1.0, abs=1e-12)  # 1 / (1 + eps) as in cocoeval
    assert ours["stats"] == pytest.approx(list(reference_eval(gt, dets).stats), abs=1e-12)


def test_annotation_id_zero_warns(coco_case):
    gt, dets = coco_case(0)
    assert min(a["id"] for a in gt["annotations"]) == 0
    with pytest.warns(UserWarning, match="annotation with id 0"):
        evaluate_coco(gt, dets)


def test_no_detections_and_files(tmp_path, coco_case):
    gt, dets = coco_case(3)
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_file.write_text(json.dumps(gt))
    dt_file.write_text(json.dumps(dets))
    from_files = evaluate_coco(gt_file, str(dt_file))
    assert from_files["stats"] == evaluate_coco(gt, dets)["stats"]
    empty = evaluate_coco(gt, [])
    assert empty["stats"][:6] == [0.0] * 6  # classes with gt exist: AP 0, not -1
    assert empty["per_class"]["class3"] == -1.0


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_backends_share_the_layout(backend, coco_case):
    gt, dets = coco_case(5)
    ref = evaluate_coco(gt, dets, backend=backend)
    ours = evaluate_coco(gt, dets)
    assert ref.keys() == ours.keys()
    np.testing.assert_allclose(ref["stats"], ours["stats"], rtol=0, atol=1e-12)
    assert ref["per_class"].keys() == ours["per_class"].keys()


def test_unknown_backend(coco_case):
    gt, dets = coco_case(1)
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate_coco(gt, dets, backend="nope")


@pytest.mark.parametrize("variant", ["no_annotations", "all_crowd", "one_image_only"])
def test_degenerate_sets_match_pycocotools(variant, coco_case, reference_eval):
    gt, dets = coco_case(3)
    if variant == "no_annotations":
        gt = dict(gt, annotations=[])
    elif variant == "all_crowd":
        gt = dict(gt, annotations=[dict(a, iscrowd=1) for a in gt["annotations"]])
    else:
        dets = [d for d in dets if d["image_id"] == 3]  # the image with > 100 detections
    ours = evaluate_coco(gt, dets)
    np.testing.assert_allclose(ours["stats"], reference_eval(gt, dets).stats, rtol=0, atol=1e-12)
    assert ours["stats"] == [-1.0] * 12 or variant == "one_image_only"
