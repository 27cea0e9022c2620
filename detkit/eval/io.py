"""Reading COCO ground truth and results into flat numpy arrays, with clear errors.

Everything downstream works on these arrays: one row per annotation or detection, images and
categories replaced by their index in the sorted id lists (the order pycocotools evaluates in).
"""

from __future__ import annotations

import json
import os
import warnings
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


def read_json(source: str | os.PathLike, what: str) -> Any:
    """A JSON file's content, or one clear error naming the file (``what`` says its role)."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        # utf-8-sig: JSON written by Windows tools often starts with a byte-order mark
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{what} file {path} is not UTF-8 text (byte {err.start}: {err.reason})"
        ) from None


def _name(source: Any, what: str) -> str:
    return f"{what} {source}" if isinstance(source, (str, os.PathLike)) else what


def _section(data: dict, key: str, where: str, default: list | None = None) -> list:
    """``data[key]``, which must be a list (``default`` when the key is absent)."""
    if key not in data and default is not None:
        return default
    rows = data.get(key)
    if not isinstance(rows, list):
        raise ValueError(f"{where}: {key!r} must be a list, got {type(rows).__name__}")
    return rows


def _column(rows: list[dict], key: str, where: str) -> list:
    try:
        return [row[key] for row in rows]
    except (KeyError, TypeError):
        bad = next(i for i, r in enumerate(rows) if not isinstance(r, dict) or key not in r)
        raise ValueError(f"{where}: entry {bad} has no {key!r} field") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(values: list, where: str, key: str, integer: bool = False) -> np.ndarray:
    """``values`` as int64 (``integer``: ints or integral floats) or float64, or a ValueError
    naming the first entry that is not such a number (JSON null, a string, true/false)."""

    def wrong(value: Any) -> bool:
        if not _is_number(value):
            return True
        return integer and isinstance(value, float) and not value.is_integer()

    bad = next((i for i, v in enumerate(values) if wrong(v)), None)
    if bad is None:
        try:
            return np.asarray(values, dtype=np.int64 if integer else np.float64).reshape(-1)
        except OverflowError:
            bad = next(i for i, v in enumerate(values) if integer and abs(v) >= 2**63)
    kind = "an integer" if integer else "a number"
    raise ValueError(f"{where}: entry {bad} has {key} {values[bad]!r}, which is not {kind}")


def _ids(values: list, where: str, key: str) -> np.ndarray:
    """Image ids as an array: all numbers or all strings (as pycocotools keys them), else a
    ValueError naming the first entry of the other kind (or a null, list, true/false)."""
    if values and all(isinstance(v, str) for v in values):
        return np.asarray(values, dtype=str)
    integral = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    return _numbers(values, where, key, integer=integral)


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
    if ids.dtype.kind != known.dtype.kind and len(ids) and len(known):
        # string ids against numeric ones (or the reverse): none of them can match
        bad = np.ones(len(ids), bool)
    else:
        idx = np.searchsorted(known, ids).clip(max=max(len(known) - 1, 0))
        bad = known[idx] != ids if len(known) else np.ones(len(ids), bool)
    if bad.any():
        unknown = sorted(set(np.asarray(ids)[bad].tolist()))[:5]
        raise ValueError(f"{where}: {int(bad.sum())} entries refer to unknown {what} {unknown}")
    return idx.astype(np.int64)


def _flag(rows: list[dict], keys: tuple[str, ...]) -> np.ndarray:
    """True where any of ``keys`` is set (a missing key is False)."""
    return np.fromiter(
        (any(bool(r.get(key)) for key in keys) for r in rows), dtype=bool, count=len(rows)
    )


def load_ground_truth(gt: str | os.PathLike | dict) -> GroundTruth:
    """Read a COCO ground-truth file or dict into arrays.

    Like pycocotools, annotations whose image or category is not listed are left out (with a
    warning that counts them); crowd comes from ``iscrowd``; VOC ``difficult`` is any of
    ``difficult``, ``ignore`` and ``iscrowd`` (converters mark VOC's difficult objects with
    one or another). Fields of the wrong type raise ValueError naming the entry.
    """
    where = _name(gt, "ground truth")
    data = gt if isinstance(gt, dict) else read_json(gt, "ground truth")
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise ValueError(f"{where}: expected a COCO dict with 'images' and 'categories'")
    images = _section(data, "images", where)
    image_ids = np.unique(_ids(_column(images, "id", f"{where} images"), f"{where} images", "id"))
    cats = _section(data, "categories", where)
    if not cats:
        raise ValueError(f"{where}: 'categories' is empty: there is no class to score")
    cat_where = f"{where} categories"
    cat_ids = _numbers(_column(cats, "id", cat_where), cat_where, "id", integer=True)
    order = np.argsort(cat_ids, kind="stable")
    category_ids = cat_ids[order]
    if len(np.unique(category_ids)) != len(category_ids):
        raise ValueError(f"{where}: duplicate category ids")
    names = [str(cats[i].get("name", cats[i]["id"])) for i in order.tolist()]
    anns = _section(data, "annotations", where, default=[])
    ann_where = f"{where} annotations"
    img = _ids(_column(anns, "image_id", ann_where), ann_where, "image_id")
    cat = _numbers(_column(anns, "category_id", ann_where), ann_where, "category_id", True)
    ids = _numbers(_column(anns, "id", ann_where), ann_where, "id", integer=True)
    boxes = _boxes(anns, ann_where) if anns else np.zeros((0, 4))
    area = _numbers(_column(anns, "area", ann_where), ann_where, "area")
    keep = np.isin(cat, category_ids)
    keep &= np.isin(img, image_ids) if img.dtype.kind == image_ids.dtype.kind else False
    if not keep.all():
        warnings.warn(
            f"{where}: left out {int((~keep).sum())} of {len(keep)} annotations whose image or "
            "category is not listed (pycocotools does not score them either)",
            stacklevel=2,
        )
    kept = [a for a, k in zip(anns, keep.tolist(), strict=True) if k]
    ids = ids[keep]
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate annotation ids")
    return GroundTruth(
        image_ids=image_ids,
        category_ids=category_ids,
        category_names=names,
        image=np.searchsorted(image_ids, img[keep]).astype(np.int64),
        category=np.searchsorted(category_ids, cat[keep]).astype(np.int64),
        boxes=boxes[keep],
        area=area[keep],
        crowd=_flag(kept, ("iscrowd",)),
        difficult=_flag(kept, ("difficult", "ignore", "iscrowd")),
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
    """Read COCO results (file or list of dicts) and check them against the ground truth.

    Detections of categories the ground truth does not list are left out with a warning that
    counts them, as pycocotools leaves them unscored (a model of more classes scored on a
    subset); unknown image ids are an error, as in pycocotools' ``loadRes``.
    """
    where = _name(predictions, "predictions")
    rows = predictions
    if isinstance(predictions, (str, os.PathLike)):
        rows = read_json(predictions, "predictions")
    if not isinstance(rows, list):
        raise ValueError(f"{where}: expected a list of detections (COCO results format)")
    if not rows:
        empty = np.zeros(0, np.int64)
        return Predictions(empty, empty, np.zeros((0, 4)), np.zeros(0))
    scores = _numbers(_column(rows, "score", where), where, "score")
    if not np.isfinite(scores).all():
        i = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"{where}: entry {i} has a non-finite score {scores[i]}")
    images = _ids(_column(rows, "image_id", where), where, "image_id")
    image = _index(images, gt.image_ids, where, "image ids")
    cats = _numbers(_column(rows, "category_id", where), where, "category_id", integer=True)
    boxes = _boxes(rows, where)
    known = np.isin(cats, gt.category_ids)
    if not known.all():
        unknown = sorted(set(cats[~known].tolist()))
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        warnings.warn(
            f"{where}: left out {int((~known).sum())} of {len(known)} detections of categories "
            f"the ground truth does not list ({shown}), as pycocotools leaves them unscored",
            stacklevel=2,
        )
    category = _index(cats[known], gt.category_ids, where, "category ids")
    return Predictions(image[known], category, boxes[known], scores[known])
