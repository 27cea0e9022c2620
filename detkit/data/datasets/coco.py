"""COCO-format detection datasets (any JSON in the COCO layout), read with pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detkit.data.boxes import xywh_to_xyxy
from detkit.data.datasets.base import DetectionDataset, read_image_size


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: malformed JSON: {err}") from None
    _check_layout(data, path)
    return data


def _check_layout(data: Any, path: Path) -> None:
    """Fail early, naming the file and the problem, instead of deep inside pycocotools."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise ValueError(f"{path}: '{key}' must be a list")
    if "images" not in data:
        raise ValueError(f"{path}: missing the 'images' list")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise ValueError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        if not isinstance(img["id"], int) or isinstance(img["id"], bool):
            raise ValueError(f"{path}: images[{i}].id must be an integer")
        if not isinstance(img["file_name"], str):
            raise ValueError(f"{path}: images[{i}].file_name must be a string")
        for key in ("width", "height"):
            value = img.get(key, 1)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{path}: images[{i}].{key} must be a positive number")
    for i, cat in enumerate(data.get("categories", [])):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise ValueError(f"{path}: categories[{i}] needs an integer 'id' and a 'name'")
    known_images = {img["id"] for img in data["images"]}
    if len(known_images) != len(data["images"]):
        raise ValueError(f"{path}: image ids are not unique")
    if not data["images"]:
        raise ValueError(f"{path}: the 'images' list is empty: there is nothing to read")
    known_cats = {cat["id"] for cat in data.get("categories", [])}
    if len(known_cats) != len(data.get("categories", [])):
        raise ValueError(f"{path}: category ids are not unique")
    ann_ids = set()
    for i, ann in enumerate(data.get("annotations", [])):
        _check_annotation(ann, i, path, known_images, known_cats)
        if ann["id"] in ann_ids:
            raise ValueError(f"{path}: annotations[{i}] repeats the annotation id {ann['id']}")
        ann_ids.add(ann["id"])


def _check_annotation(ann: Any, i: int, path: Path, images: set, cats: set) -> None:
    if not isinstance(ann, dict):
        raise ValueError(f"{path}: annotations[{i}] must be an object")
    bbox = ann.get("bbox")
    if (
        not isinstance(bbox, list)
        or len(bbox) != 4
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
    ):
        raise ValueError(f"{path}: annotations[{i}].bbox must be 4 numbers [x, y, w, h]")
    if ann.get("image_id") not in images:
        raise ValueError(
            f"{path}: annotations[{i}] refers to unknown image_id {ann.get('image_id')!r}"
        )
    if ann.get("category_id") not in cats:
        raise ValueError(
            f"{path}: annotations[{i}] has unknown category_id {ann.get('category_id')!r}; "
            f"known ids: {sorted(cats)}"
        )
    if not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"{path}: annotations[{i}].bbox {bbox} is not finite")
    # pycocotools indexes annotations by id: without one it fails deep inside
    if not isinstance(ann.get("id"), int) or isinstance(ann.get("id"), bool):
        raise ValueError(f"{path}: annotations[{i}] needs an integer 'id'")


class COCODetection(DetectionDataset):
    """A COCO-format dataset: ``image_dir`` holds the images named by ``file_name``.

    Category ids sorted ascending become labels ``0..C-1`` (``label_to_category_id`` maps
    back). Crowd boxes are kept with ``iscrowd=True``; images without annotations are kept as
    negatives. Images lacking ``width``/``height`` in the JSON are measured from their header.
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        transforms: Callable | None = None,
        skip_bad_images: bool = False,
        cache_images: bool = False,
    ):
        super().__init__(
            transforms=transforms, skip_bad_images=skip_bad_images, cache_images=cache_images
        )
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        data = _load_json(self.ann_file)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.label_to_category_id = [int(c["id"]) for c in cats]
        self.class_names = [str(c["name"]) for c in cats]
        label_of = {cid: i for i, cid in enumerate(self.label_to_category_id)}
        records = [self._record(img, label_of) for img in data["images"]]
        self._set_records(records, source=str(self.ann_file))

    def _record(self, img: dict[str, Any], label_of: dict[int, int]):
        path = self.image_dir / img["file_name"]
        size_source = f"{self.ann_file} (images id {img['id']}: width, height)"
        if "width" in img and "height" in img:
            size = (int(img["width"]), int(img["height"]))
        elif path.is_file():
            size, size_source = read_image_size(path), "its header"
        else:
            size = (0, 0)  # reported as a missing image by _set_records
        anns = self.coco.imgToAnns.get(img["id"], [])
        boxes = xywh_to_xyxy(np.array([a["bbox"] for a in anns], dtype=np.float32))
        labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
        difficult = np.array([bool(a.get("difficult", 0)) for a in anns], dtype=bool)
        return self._make_record(
            img["id"], path, img["file_name"], size, boxes, labels, crowd, difficult, size_source
        )

    def coco_ground_truth(self) -> dict[str, Any]:
        """The annotation file as written, restricted to this dataset's images.

        Boxes, ``area``, ``iscrowd`` and ``ignore`` are the file's own (:meth:`to_coco` would
        give clipped float32 boxes with ``area = w * h``), so evaluation gives the numbers
        the official tools give on this file. Images skipped as unreadable are left out. An
        annotation without ``area`` (pycocotools needs one) gets its box's ``w * h``.
        """
        kept = {record.image_id for record in self.records}
        data = self.coco.dataset
        truth = {k: copy.deepcopy(v) for k, v in data.items() if k not in ("images", "annotations")}
        truth["images"] = [copy.deepcopy(i) for i in data["images"] if i["id"] in kept]
        anns = [copy.deepcopy(a) for a in data.get("annotations", []) if a["image_id"] in kept]
        no_area = [a for a in anns if "area" not in a]
        for ann in no_area:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        if no_area:
            warnings.warn(
                f"{self.ann_file}: {len(no_area)} annotation(s) have no 'area'; "
                "evaluating them with their box's w*h",
                stacklevel=2,
            )
        truth["annotations"] = anns
        truth.setdefault("categories", [])
        return truth
