"""Reading COCO ground truth and results into flat numpy arrays, with clear errors.

Everything downstream works on these arrays: one row per annotation or detection, images and
categories replaced by their index in the sorted id lists (the order pycocotools evaluates in).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class GroundTruth:
    """COCO ground truth as arrays; ``image``/``category`` index ``image_ids``/``category_ids``."""

    image_ids: np.ndarray  # sorted unique image ids
    category_ids: np.ndarray  # sorted unique category ids
    category_names: list[str]
    image: np.ndarray  # [G] int64
    category: np.ndarray  # [G] int64
    boxes: np.ndarray  # [G, 4] float64 xywh
    area: np.ndarray  # [G] float64, the annotation's "area" field
    crowd: np.ndarray  # [G] bool
    difficult: np.ndarray  # [G] bool (VOC)
    ids: np.ndarray  # [G] int64 annotation ids


@dataclass
class Predictions:
    """COCO results as arrays, in file order."""

    image: np.ndarray  # [D] int64 index into GroundTruth.image_ids
    category: np.ndarray  # [D] int64 index into GroundTruth.category_ids
    boxes: np.ndarray  # [D, 4] float64 xywh
    scores: np.ndarray  # [D] float64


def _read_json(source: str | os.PathLike, what: str) -> Any:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None


def _name(source: Any, what: str) -> str:
    return f"{what} {source}" if isinstance(source, (str, os.PathLike)) else what


def _column(rows: list[dict], key: str, where: str) -> list:
    try:
        return [row[key] for row in rows]
    except (KeyError, TypeError):
        bad = next(i for i, r in enumerate(rows) if not isinstance(r, dict) or key not in r)
        raise ValueError(f"{where}: entry {bad} has no {key!r} field") from None


def _boxes(rows: list[dict], where: str) -> np.ndarray:
    raw = _column(rows, "bbox", where)
    try:
        boxes = np.array(raw, dtype=np.float64).reshape(len(raw), 4)
    except (ValueError, TypeError):
        raise ValueError(f"{where}: every 'bbox' must be 4 numbers [x, y, w, h]") from None
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] < 0) | (boxes[:, 3] < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{where}: entry {i} has bbox {raw[i]} (NaN/inf or negative width/height); "
            f"{int(bad.sum())} bad boxes in total"
        )
    return boxes


def _index(ids: np.ndarray, known: np.ndarray, where: str, what: str) -> np.ndarray:
    idx = np.searchsorted(known, ids).clip(max=max(len(known) - 1, 0))
    bad = known[idx] != ids if len(known) else np.ones(len(ids), bool)
    if bad.any():
        unknown = sorted(set(np.asarray(ids)[bad].tolist()))[:5]
        raise ValueError(f"{where}: {int(bad.sum())} entries refer to unknown {what} {unknown}")
    return idx.astype(np.int64)


def _flag(rows: list[dict], keys: tuple[str, ...]) -> np.ndarray:
    def first(row: dict) -> bool:
        for key in keys:
            if key in row:
                return bool(row[key])
        return False

    return np.fromiter((first(r) for r in rows), dtype=bool, count=len(rows))


def load_ground_truth(gt: str | os.PathLike | dict) -> GroundTruth:
    """Read a COCO ground-truth file or dict into arrays.

    Like pycocotools, annotations whose image or category is not listed are left out; crowd
    comes from ``iscrowd``; VOC ``difficult`` from ``difficult``, else ``ignore``, else
    ``iscrowd``.
    """
    where = _name(gt, "ground truth")
    data = gt if isinstance(gt, dict) else _read_json(gt, "ground truth")
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise ValueError(f"{where}: expected a COCO dict with 'images' and 'categories'")
    image_ids = np.unique(np.asarray(_column(data["images"], "id", f"{where} images")))
    cats = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = np.asarray(_column(cats, "id", f"{where} categories"), dtype=np.int64)
    if len(np.unique(category_ids)) != len(category_ids):
        raise ValueError(f"{where}: duplicate category ids")
    names = [str(c.get("name", c["id"])) for c in cats]
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise ValueError(f"{where}: 'annotations' must be a list")
    img = np.asarray(_column(anns, "image_id", where)) if anns else np.zeros(0, np.int64)
    cat = np.asarray(_column(anns, "category_id", where), np.int64) if anns else img
    keep = np.isin(img, image_ids) & np.isin(cat, category_ids)
    anns = [a for a, k in zip(anns, keep.tolist(), strict=True) if k]
    ids = np.asarray(_column(anns, "id", where), dtype=np.int64) if anns else np.zeros(0, np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate annotation ids")
    boxes = _boxes(anns, where) if anns else np.zeros((0, 4))
    area = np.asarray(_column(anns, "area", where), np.float64) if anns else np.zeros(0)
    return GroundTruth(
        image_ids=image_ids,
        category_ids=category_ids,
        category_names=names,
        image=np.searchsorted(image_ids, img[keep]).astype(np.int64),
        category=np.searchsorted(category_ids, cat[keep]).astype(np.int64),
        boxes=boxes,
        area=area,
        crowd=_flag(anns, ("iscrowd",)),
        difficult=_flag(anns, ("difficult", "ignore", "iscrowd")),
        ids=ids,
    )


def restrict_ground_truth(truth: GroundTruth, image_ids: np.ndarray) -> GroundTruth:
    """``truth`` on the images ``image_ids`` only (all categories kept), as pycocotools sees a
    file whose image list holds just those images. Unknown image ids raise ValueError."""
    known = np.unique(np.asarray(image_ids, dtype=np.int64))
    index = _index(known, truth.image_ids, "ground truth", "image ids")
    keep = np.isin(truth.image, index)
    return GroundTruth(
        image_ids=known,
        category_ids=truth.category_ids,
        category_names=truth.category_names,
        image=np.searchsorted(index, truth.image[keep]).astype(np.int64),
        category=truth.category[keep],
        boxes=truth.boxes[keep],
        area=truth.area[keep],
        crowd=truth.crowd[keep],
        difficult=truth.difficult[keep],
        ids=truth.ids[keep],
    )


def load_predictions(predictions: str | os.PathLike | list, gt: GroundTruth) -> Predictions:
    """Read COCO results (file or list of dicts) and check them against the ground truth."""
    where = _name(predictions, "predictions")
    rows = predictions
    if isinstance(predictions, (str, os.PathLike)):
        rows = _read_json(predictions, "predictions")
    if not isinstance(rows, list):
        raise ValueError(f"{where}: expected a list of detections (COCO results format)")
    if not rows:
        empty = np.zeros(0, np.int64)
        return Predictions(empty, empty, np.zeros((0, 4)), np.zeros(0))
    scores = _column(rows, "score", where)
    try:
        scores = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: every 'score' must be a number") from None
    if not np.isfinite(scores).all():
        i = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"{where}: entry {i} has a non-finite score {scores[i]}")
    image = _index(np.asarray(_column(rows, "image_id", where)), gt.image_ids, where, "image ids")
    cats = np.asarray(_column(rows, "category_id", where))
    category = _index(cats, gt.category_ids, where, "category ids")
    return Predictions(image, category, _boxes(rows, where), scores)
