"""Running the reference tools (pycocotools, faster-coco-eval) with detkit's result layout."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

from detkit.eval.io import load_ground_truth, load_predictions, read_json
from detkit.eval.stats import stats_dict

BACKENDS = ("detkit", "pycocotools", "faster_coco_eval")


def _tool(backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError:
            raise ValueError("backend 'faster_coco_eval' is not installed") from None
        return COCO, COCOeval_faster
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def run_backend(backend: str, gt, predictions) -> dict:
    """Evaluate with a reference tool; inputs are checked by detkit's loaders first."""
    coco_cls, eval_cls = _tool(backend)
    truth = load_ground_truth(gt)
    load_predictions(predictions, truth)  # same clear errors whatever the backend
    # The files are read here as for detkit's loaders (a byte-order mark is fine) and handed
    # to the tool as data; its own readers would choke on what those accept.
    gt = copy.deepcopy(gt) if isinstance(gt, dict) else read_json(gt, "ground truth")
    if isinstance(predictions, list):
        dets = copy.deepcopy(predictions)
    else:
        dets = read_json(predictions, "predictions")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not dets:
            coco_dt = coco_cls()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": []}
            coco_dt.dataset["categories"] = list(coco_gt.dataset["categories"])
            coco_dt.createIndex()
        else:
            coco_dt = coco_gt.loadRes(dets)
        evaluator = eval_cls(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = np.asarray(evaluator.eval["precision"])
    per_class = []
    for k in range(precision.shape[2]):
        s = precision[:, :, k, 0, -1]
        per_class.append(float(np.mean(s[s > -1])) if (s > -1).any() else -1.0)
    return stats_dict(list(np.asarray(evaluator.stats, np.float64)), per_class, truth)
