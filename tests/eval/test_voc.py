import numpy as np
import pytest

from detkit.eval import evaluate_voc
from detkit.eval.ap import voc_ap


def _gt(boxes, difficult=None):
    anns = [
        {
            "id": i + 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": b,
            "area": b[2] * b[3],
            "iscrowd": 0,
            "difficult": int(bool(difficult and difficult[i])),
        }
        for i, b in enumerate(boxes)
    ]
    return {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": anns}


def _dets(boxes_scores):
    return [{"image_id": 1, "category_id": 1, "bbox": b, "score": s} for b, s in boxes_scores]


# gts A, B, C and a difficult D; in score order: TP(A), FP, on-difficult, TP(B), FP(dup of A)
GT = _gt(
    [[0, 0, 10, 10], [50, 50, 10, 10], [100, 0, 10, 10], [0, 100, 10, 10]], difficult=[0, 0, 0, 1]
)
DETS = _dets(
    [
        ([0, 0, 10, 10], 0.9),
        ([200, 200, 5, 5], 0.8),
        ([0, 100, 10, 10], 0.7),
        ([50, 50, 10, 10], 0.6),
        ([0, 0, 10, 10], 0.5),
    ]
)


def test_area_and_11point_differ_as_computed_by_hand():
    # recall [1/3,1/3,1/3,2/3,2/3], precision [1,.5,.5,2/3,.5]
    area = evaluate_voc(GT, DETS, method="area")
    assert area["mAP"] == pytest.approx(1 / 3 + (1 / 3) * (2 / 3), abs=1e-12)  # 5/9
    eleven = evaluate_voc(GT, DETS, method="11point")
    assert eleven["mAP"] == pytest.approx((4 * 1 + 3 * (2 / 3)) / 11, abs=1e-12)  # 6/11
    assert eleven["per_class"] == {"a": eleven["mAP"]}


def test_use_difficult_counts_them_as_positives():
    # recall [.25,.25,.5,.75,.75], precision [1,.5,2/3,.75,.6] -> .25 * 1 + .5 * .75
    assert evaluate_voc(GT, DETS, use_difficult=True)["mAP"] == pytest.approx(0.625, abs=1e-12)


def test_difficult_read_from_ignore_flag():
    gt = _gt([[0, 0, 10, 10], [50, 50, 10, 10]])
    for ann, flag in zip(gt["annotations"], (0, 1), strict=True):
        del ann["difficult"]
        ann["ignore"] = flag
    dets = _dets([([50, 50, 10, 10], 0.9), ([0, 0, 10, 10], 0.8)])
    assert evaluate_voc(gt, dets)["mAP"] == pytest.approx(1.0)  # on-difficult det ignored


def test_plus_one_convention():
    gt = _gt([[0, 0, 10, 10]])
    dets = _dets([([0, 0, 10, 5], 0.9)])  # IoU .5 (not > .5) plainly, 66/121 with +1
    assert evaluate_voc(gt, dets)["mAP"] == 0.0
    assert evaluate_voc(gt, dets, plus_one=True)["mAP"] == pytest.approx(1.0)
    assert evaluate_voc(gt, dets, iou_threshold=0.4)["mAP"] == pytest.approx(1.0)


def test_devkit_only_looks_at_the_best_gt():
    # The second det overlaps A and B equally (0.818): the devkit takes A (first), already
    # detected -> false positive, although B is free (COCO would match it to B).
    gt = _gt([[0, 0, 10, 10], [2, 0, 10, 10]])
    dets = _dets([([0, 0, 10, 10], 0.9), ([1, 0, 10, 10], 0.8)])
    assert evaluate_voc(gt, dets)["mAP"] == pytest.approx(0.5)


def test_voc_ap_bad_method():
    with pytest.raises(ValueError, match="method"):
        voc_ap(np.array([0.5]), np.array([1.0]), method="12point")
    with pytest.raises(ValueError, match="method"):
        evaluate_voc(GT, DETS, method="bogus")


def _devkit_voc(gt, dets, thr, use_07):
    """Straight port of py-faster-rcnn's voc_eval (the devkit's Python twin), one class."""
    recs = {}
    for a in gt["annotations"]:
        r = recs.setdefault(a["image_id"], {"bbox": [], "difficult": [], "det": []})
        x, y, w, h = a["bbox"]
        r["bbox"].append([x, y, x + w, y + h])
        r["difficult"].append(bool(a["difficult"]))
        r["det"].append(False)
    npos = sum(not d for r in recs.values() for d in r["difficult"])
    order = np.argsort([-d["score"] for d in dets], kind="stable")
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for i, j in enumerate(order):
        x, y, w, h = dets[j]["bbox"]
        bb = np.array([x, y, x + w, y + h])
        r = recs.get(dets[j]["image_id"], {"bbox": [], "difficult": [], "det": []})
        ovmax, g = -np.inf, -1
        if r["bbox"]:
            bbgt = np.array(r["bbox"])
            iw = np.maximum(np.minimum(bbgt[:, 2], bb[2]) - np.maximum(bbgt[:, 0], bb[0]), 0)
            ih = np.maximum(np.minimum(bbgt[:, 3], bb[3]) - np.maximum(bbgt[:, 1], bb[1]), 0)
            inter = iw * ih
            uni = (
                (bb[2] - bb[0]) * (bb[3] - bb[1])
                + (bbgt[:, 2] - bbgt[:, 0]) * (bbgt[:, 3] - bbgt[:, 1])
                - inter
            )
            ov = inter / uni
            ovmax, g = ov.max(), int(ov.argmax())
        if ovmax > thr:
            if not r["difficult"][g]:
                if not r["det"][g]:
                    tp[i], r["det"][g] = 1, True
                else:
                    fp[i] = 1
        else:
            fp[i] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return voc_ap(
        tp / npos,
        tp / np.maximum(tp + fp, np.finfo(np.float64).eps),
        "11point" if use_07 else "area",
    )


@pytest.mark.parametrize("seed", range(4))
def test_random_sets_match_a_devkit_port(seed):
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for image_id in range(1, 16):
        for _ in range(rng.integers(0, 6)):
            x, y, w, h = *rng.uniform(0, 100, 2), *rng.uniform(5, 50, 2)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "difficult": int(rng.random() < 0.2),
                }
            )
            for _ in range(rng.integers(0, 4)):
                j = rng.normal(0, 4, 4)
                dets.append(
                    {
                        "image_id": image_id,
                        "category_id": 1,
                        "score": float(rng.random()),
                        "bbox": [x + j[0], y + j[1], max(w + j[2], 1), max(h + j[3], 1)],
                    }
                )
    gt = {
        "images": [{"id": i} for i in range(1, 16)],
        "categories": [{"id": 1}],
        "annotations": anns,
    }
    for method, use_07 in (("area", False), ("11point", True)):
        ours = evaluate_voc(gt, dets, iou_threshold=0.5, method=method)["mAP"]
        assert abs(ours - _devkit_voc(gt, dets, 0.5, use_07)) <= 1e-12


def test_no_ground_truth_or_no_detections():
    assert evaluate_voc(_gt([]), DETS)["mAP"] == -1.0  # no positives anywhere: undefined
    assert evaluate_voc(GT, [])["mAP"] == 0.0
