"""Random COCO ground truth / results with the hard cases of the COCO protocol."""

import contextlib
import io

import numpy as np
import pytest


def make_coco_case(seed: int, images: int = 25, classes: int = 4, crowd: float = 0.1):
    """Crowd boxes, tiny and huge areas, empty images, >100 detections for one class,
    duplicates, tied scores, a declared class with no gt, an annotation with id 0."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 2 * c + 1, "name": f"class{c}"} for c in range(classes)]
    gt_cats = [c["id"] for c in cats[:-1]]  # the last class never has ground truth
    anns, dets = [], []
    for image_id in range(1, images + 1):
        for _ in range(rng.integers(0, 9) if image_id % 5 else 0):  # every 5th image empty
            x, y = rng.uniform(0, 300, 2)
            w, h = rng.uniform(1, 120, 2) * rng.choice([0.05, 0.3, 1.0, 4.0])
            area = w * h * rng.choice([1.0, rng.uniform(0.3, 1.5)])
            if rng.random() < 0.03:
                area = 2e10  # beyond every area range: ignored even for "all"
            anns.append(
                {
                    "id": len(anns) + int(seed % 2 == 1),  # even seeds have an id 0
                    "image_id": image_id,
                    "category_id": int(rng.choice(gt_cats)),
                    "bbox": [float(x), float(y), float(w), float(h)],
                    "area": float(area),
                    "iscrowd": int(rng.random() < crowd),
                }
            )
            for _ in range(rng.integers(0, 5)):
                jitter = rng.normal(0, 0.15, 4) * np.r_[w, h, w, h] * rng.choice([0, 1])
                box = np.maximum(np.r_[x, y, w, h] + jitter, [-5, -5, 0.5, 0.5])
                cat = anns[-1]["category_id"] if rng.random() < 0.8 else cats[-1]["id"]
                dets.append(_det(image_id, cat, box, rng))
                if rng.random() < 0.1:
                    dets.append(dict(dets[-1]))  # exact duplicate
        for _ in range(rng.integers(0, 4)):
            box = np.r_[rng.uniform(0, 300, 2), rng.uniform(1, 150, 2)]
            dets.append(_det(image_id, int(rng.choice(gt_cats)), box, rng))
        if image_id == 3:  # more than 100 detections of one class in one image
            for _ in range(130):
                box = np.r_[rng.uniform(0, 300, 2), rng.uniform(2, 60, 2)]
                dets.append(_det(image_id, gt_cats[0], box, rng))
    gt = {"images": [{"id": i} for i in range(1, images + 1)], "categories": cats}
    gt["annotations"] = anns
    return gt, dets


def _det(image_id, cat, box, rng):
    score = float(np.round(rng.random(), 1))  # coarse scores: many ties
    bbox = [float(v) for v in box]
    return {"image_id": image_id, "category_id": int(cat), "bbox": bbox, "score": score}


def pycocotools_eval(gt: dict, dets: list):
    """Reference COCOeval object after summarize(), its printing silenced."""
    import copy

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.fixture
def coco_case():
    return make_coco_case


@pytest.fixture
def reference_eval():
    return pycocotools_eval
