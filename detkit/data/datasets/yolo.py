"""Ultralytics YOLO-layout datasets: ``images/<split>/`` + ``labels/<split>/*.txt``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detkit.data.boxes import cxcywh_norm_to_xyxy
from detkit.data.datasets.base import DetectionDataset, ImageRecord, read_image_size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def read_data_yaml(path: Path) -> dict[str, Any]:
    """Load an Ultralytics data YAML, checking the parts detkit uses."""
    if not path.is_file():
        raise FileNotFoundError(f"YOLO data YAML not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: malformed YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'names' and split entries")
    return data


def names_from_yaml(names: Any, path: Path) -> list[str]:
    """``names`` as a list, or a dict ``{0: name, 1: name}`` with contiguous ids."""
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: 'names' keys must be integers") from None
        if keys != list(range(len(keys))):
            raise ValueError(f"{path}: 'names' ids must be 0..{len(keys) - 1}, got {keys}")
        by_int = {int(k): v for k, v in names.items()}
        return [str(by_int[k]) for k in keys]
    raise ValueError(f"{path}: 'names' must be a list or a dict, got {type(names).__name__}")


def parse_yolo_labels(path: Path, num_classes: int, names: Sequence[str]) -> np.ndarray:
    """Rows ``[class, cx, cy, w, h]`` (normalised) of one label file; a missing file means
    no objects. Problems raise ValueError naming the file and line."""
    if not path.is_file():
        return np.zeros((0, 5), dtype=np.float32)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise ValueError(
                f"{path}:{number}: expected 5 values 'class cx cy w h', got {len(fields)}"
            )
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise ValueError(f"{path}:{number}: non-numeric value in {line.strip()!r}") from None
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise ValueError(
                f"{path}:{number}: unknown class id {fields[0]}; known: {dict(enumerate(names))}"
            )
        rows.append(values)
    return np.array(rows, dtype=np.float32).reshape(-1, 5)


class YOLODetection(DetectionDataset):
    """An Ultralytics-layout dataset.

    ``root`` is either the dataset directory (``images/<split>``, ``labels/<split>``, class
    names from ``class_names`` or a ``data.yaml``/``dataset.yaml`` inside it) or the data YAML
    itself (``path``, ``<split>: images/<split>``, ``names`` as a list or dict). Labels live
    where the image path has ``labels`` instead of its last ``images`` directory.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        class_names: Sequence[str] | None = None,
        transforms: Callable | None = None,
        skip_bad_images: bool = False,
        cache_images: bool = False,
    ):
        super().__init__(
            transforms=transforms, skip_bad_images=skip_bad_images, cache_images=cache_images
        )
        self.split = split
        image_dir, yaml_names = self._locate(Path(root), split)
        names = list(class_names) if class_names is not None else yaml_names
        if names is None:
            raise ValueError(
                f"YOLO dataset {root}: no class names: pass class_names or provide a data YAML"
            )
        self.class_names = [str(n) for n in names]
        self.label_to_category_id = list(range(1, len(self.class_names) + 1))
        if not image_dir.is_dir():
            raise FileNotFoundError(f"YOLO image directory not found: {image_dir}")
        files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.image_dir = image_dir
        records = [self._record(k + 1, p) for k, p in enumerate(files)]
        self._set_records(records, source=f"YOLO {image_dir}")

    def _locate(self, root: Path, split: str) -> tuple[Path, list[str] | None]:
        yaml_path = root if root.suffix in (".yaml", ".yml") else None
        if yaml_path is None:
            for name in ("data.yaml", "dataset.yaml"):
                if (root / name).is_file():
                    yaml_path = root / name
                    break
        if yaml_path is None:
            return root / "images" / split, None
        data = read_data_yaml(yaml_path)
        base = Path(data.get("path") or yaml_path.parent)
        if not base.is_absolute():
            base = yaml_path.parent / base
        names = names_from_yaml(data["names"], yaml_path) if "names" in data else None
        entry = data.get(split)
        if entry is None:
            if yaml_path == root:
                raise ValueError(f"{yaml_path}: no entry for split '{split}'")
            return root / "images" / split, names
        if not isinstance(entry, str):
            raise ValueError(f"{yaml_path}: split '{split}' must be a directory path")
        return base / entry, names

    def _label_path(self, image: Path) -> Path:
        parts = list(image.parts)
        idx = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
        if idx is None:
            return image.with_suffix(".txt")
        parts[idx] = "labels"
        return Path(*parts).with_suffix(".txt")

    def _record(self, number: int, image: Path) -> ImageRecord:
        rows = parse_yolo_labels(self._label_path(image), len(self.class_names), self.class_names)
        if self.skip_bad_images:
            try:
                width, height = read_image_size(image)
            except ValueError:
                width, height = 0, 0
        else:
            width, height = read_image_size(image)
        boxes = cxcywh_norm_to_xyxy(rows[:, 1:], width, height)
        name = str(image.relative_to(self.image_dir))
        return self._make_record(number, image, name, (width, height), boxes, rows[:, 0])
