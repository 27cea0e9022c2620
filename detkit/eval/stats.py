"""The public layout of a COCO evaluation result, shared by detkit's evaluator and the
reference backends (pycocotools, faster-coco-eval)."""

from __future__ import annotations

from detkit.eval.io import GroundTruth

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def class_keys(truth: GroundTruth) -> list:
    """Category names when they are unique, else the category ids."""
    names = truth.category_names
    return names if len(set(names)) == len(names) else truth.category_ids.tolist()


def stats_dict(stats: list[float], per_class: list[float], truth: GroundTruth) -> dict:
    """``{"stats": [12 floats in summarize() order], "AP": ..., ..., "per_class": {...}}``."""
    result: dict = {"stats": [float(s) for s in stats]}
    result.update({name: float(s) for name, s in zip(STAT_NAMES, stats, strict=True)})
    result["per_class"] = {k: float(v) for k, v in zip(class_keys(truth), per_class, strict=True)}
    return result
