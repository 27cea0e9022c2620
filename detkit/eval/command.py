"""``detkit eval gt=... predictions=... protocol=...``: evaluate result files, print, save."""

from __future__ import annotations

import os
from pathlib import Path

from detkit.errors import UserError
from detkit.eval.backends import BACKENDS
from detkit.eval.coco import RECALL_THRESHOLDS, coco_from_arrays
from detkit.eval.curves import at_threshold, best_f1, class_curves, confusion_matrix
from detkit.eval.io import load_ground_truth, load_predictions
from detkit.eval.report import print_table, write_report
from detkit.eval.voc import voc_from_arrays

PROTOCOLS = ("coco", "voc07", "voc12")


def check_options(protocol: str, backend: str) -> None:
    """Refuse a protocol/backend pair that would not be honoured, in one line.

    The reference backends (pycocotools, faster-coco-eval) implement the COCO protocol only:
    neither has VOC's 11-point or all-point AP at IoU 0.5, so VOC protocols are detkit's.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if protocol != "coco" and backend != "detkit":
        raise UserError(
            f"backend={backend} computes the COCO protocol only (it has no VOC AP); "
            f"protocol={protocol} is computed by detkit: drop backend= or use protocol=coco"
        )


def run(
    gt: str | os.PathLike | dict,
    predictions: str | os.PathLike | list,
    protocol: str = "coco",
    output_dir: str | os.PathLike = ".",
    backend: str = "detkit",
    score_threshold: float = 0.25,
    plots: bool = True,
    quiet: bool = False,
) -> dict:
    """Evaluate, print a table, write ``metrics.json`` and the plots to ``output_dir``.

    ``protocol``: ``coco`` (12 COCO stats), ``voc07`` (11-point AP at IoU 0.5) or ``voc12``
    (area AP at IoU 0.5). ``backend`` (``detkit``, ``pycocotools`` or ``faster_coco_eval``)
    computes the COCO stats; VOC protocols are detkit's only. Every protocol also reports
    per-class best-F1 thresholds and precision/recall/F1 at ``score_threshold`` (from the
    COCO matching at IoU 0.5; the VOC protocols ignore difficult objects there too) and a
    confusion matrix at that score threshold. Returns the dict written to metrics.json.
    """
    check_options(protocol, backend)
    truth = load_ground_truth(gt)
    pred = load_predictions(predictions, truth)
    # VOC ignores its difficult objects: the curves and the confusion matrix do too.
    ignore = None if protocol == "coco" else truth.difficult
    coco = coco_from_arrays(truth, pred, keep_match=True, ignore=ignore)
    keys = list(coco["per_class"])
    if protocol == "coco":
        result = {"protocol": "coco", "backend": backend}
        if backend != "detkit":
            from detkit.eval.backends import run_backend

            coco = {**coco, **run_backend(backend, gt, predictions)}
        result.update({k: v for k, v in coco.items() if k not in ("match", "precision")})
    else:
        method = "11point" if protocol == "voc07" else "area"
        voc = voc_from_arrays(truth, pred, 0.5, method)
        result = {"protocol": protocol, "mAP": voc["mAP"], "per_class": voc["per_class"]}
    curves = class_curves(coco["match"])
    result["best_f1"] = {k: best_f1(c) for k, c in zip(keys, curves, strict=True)}
    result["at_score_threshold"] = {
        "score_threshold": score_threshold,
        "per_class": {
            k: at_threshold(c, score_threshold) for k, c in zip(keys, curves, strict=True)
        },  # noqa: E501
    }
    matrix = confusion_matrix(truth, pred, 0.5, score_threshold, ignore=ignore)
    result["confusion_matrix"] = {"labels": [*map(str, keys), "background"], "matrix": matrix}
    if not quiet:
        print_table({k: v for k, v in result.items() if k != "stats"})
    names = [str(k) for k in keys]
    pr = (RECALL_THRESHOLDS, coco["precision"][0, :, :, 0])
    write_report(
        result,
        Path(output_dir),
        class_names=names,
        curves=curves if plots else None,
        pr=pr if plots else None,
        confusion=matrix if plots else None,
    )
    return result
