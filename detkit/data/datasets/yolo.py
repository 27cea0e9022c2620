"""Ultralytics YOLO-layout datasets: ``images/<split>/`` + ``labels/<split>/*.txt``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from detkit.data.boxes import cxcywh_norm_to_xyxy
from detkit.data.datasets.base import DetectionDataset, ImageRecord, read_image_size

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Class-name files that annotation tools (labelImg, CVAT) write among the label files
NOT_LABEL_FILES = {"classes.txt"}


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


def read_utf8_text(path: Path) -> str:
    """A text file's contents (a byte order mark is dropped); other encodings name the file."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None


def split_path(base: Path, entry: Any, yaml_path: Path) -> Path:
    """A split entry of the data YAML as a path under ``base``. Roboflow exports write
    ``../train/images`` next to their data.yaml: like Ultralytics, such a path that does
    not exist is retried without its leading ``../``."""
    if not isinstance(entry, str):
        raise ValueError(
            f"{yaml_path}: split entries must be paths (directories or image-list .txt "
            f"files), got {entry!r}"
        )
    path = base / entry
    if not path.exists() and entry.startswith("../"):
        path = base / entry[3:]
    return path


def read_image_list(path: Path, root: Path) -> list[Path]:
    """The images of an Ultralytics image-list file, one path a line. Lines starting with
    ``./`` are relative to the list's folder (Ultralytics' rule), other relative paths to
    the dataset root."""
    images = []
    for number, line in enumerate(read_utf8_text(path).splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        image = path.parent / line[2:] if line.startswith("./") else root / line
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(
                f"{path}:{number}: {line!r} is not an image file "
                f"({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        images.append(image)
    return images


def labels_counterpart(path: Path) -> Path | None:
    """``path`` with its last ``images`` component replaced by ``labels`` (Ultralytics'
    rule), or None when it has no such component."""
    parts = list(path.parts)
    if "images" not in parts:
        return None
    parts[len(parts) - 1 - parts[::-1].index("images")] = "labels"
    return Path(*parts)


def polygon_box(coords: Sequence[float]) -> list[float]:
    """Normalised ``[cx, cy, w, h]`` of the smallest box around ``x1 y1 x2 y2 ...``, as
    Ultralytics trains detection on segmentation labels."""
    xs, ys = coords[0::2], coords[1::2]
    x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def parse_yolo_labels(
    path: Path, num_classes: int, names: Sequence[str], counts: dict[str, int] | None = None
) -> np.ndarray:
    """Rows ``[class, cx, cy, w, h]`` (normalised) of one label file; a missing file means
    no objects. Problems raise ValueError naming the file and line.

    Segmentation polygons ``class x1 y1 x2 y2 x3 y3 ...`` become their bounding box and
    repeated rows are dropped; both are added to ``counts`` (``polygons``, ``duplicates``)
    for the dataset's warning.
    """
    counts = {} if counts is None else counts
    if not path.is_file():
        return np.zeros((0, 5), dtype=np.float32)
    rows, seen = [], set()
    for number, line in enumerate(read_utf8_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        polygon = len(fields) >= 7 and len(fields) % 2 == 1
        if len(fields) != 5 and not polygon:
            raise ValueError(
                f"{path}:{number}: expected 5 values 'class cx cy w h' or a polygon "
                f"'class x1 y1 x2 y2 x3 y3 ...', got {len(fields)}"
            )
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise ValueError(f"{path}:{number}: non-numeric value in {line.strip()!r}") from None
        cls = values[0]
        # finiteness first: int() of nan or inf raises without naming the file
        if not (math.isfinite(cls) and cls == int(cls) and 0 <= cls < num_classes):
            raise ValueError(
                f"{path}:{number}: unknown class id {fields[0]}; known: {dict(enumerate(names))}"
            )
        if tuple(values) in seen:
            counts["duplicates"] = counts.get("duplicates", 0) + 1
            continue
        seen.add(tuple(values))
        if polygon:
            counts["polygons"] = counts.get("polygons", 0) + 1
            values = [cls, *polygon_box(values[1:])]
        rows.append(values)
    return np.array(rows, dtype=np.float32).reshape(-1, 5)


class YOLODetection(DetectionDataset):
    """An Ultralytics-layout dataset.

    ``root`` is either the dataset directory (``images/<split>``, ``labels/<split>``, class
    names from ``class_names`` or a ``data.yaml``/``dataset.yaml`` inside it) or the data YAML
    itself (``path``, ``<split>: images/<split>``, ``names`` as a list or dict). Labels live
    where the image path has ``labels`` instead of its last ``images`` directory.

    In the YAML, a relative ``path`` is relative to the YAML's folder, and no ``path`` means
    that folder. A split is a directory, an image-list ``.txt`` file (see
    :func:`read_image_list`) or a list of those; a missing ``../x`` is retried as ``x``
    (Roboflow exports, see :func:`split_path`). Polygon labels become their boxes; duplicate
    label rows and label files without an image are counted in one warning.
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
        sources, yaml_names, base = self._locate(Path(root), split)
        names = list(class_names) if class_names is not None else yaml_names
        if names is None:
            raise ValueError(
                f"YOLO dataset {root}: no class names: pass class_names or provide a data YAML"
            )
        self.class_names = [str(n) for n in names]
        self.label_to_category_id = list(range(1, len(self.class_names) + 1))
        files = [f for source in sources for f in self._source_images(source, base)]
        # file names are relative to the one image directory, else to the dataset root
        self.image_dir = sources[0] if len(sources) == 1 and sources[0].is_dir() else base
        self._label_counts = {"polygons": 0, "duplicates": 0}
        records = [self._record(k + 1, p) for k, p in enumerate(files)]
        source = f"YOLO {', '.join(str(s) for s in sources)}"
        self._warn_label_fixes(source, sources, files)
        self._set_records(records, source=source)

    def _locate(self, root: Path, split: str) -> tuple[list[Path], list[str] | None, Path]:
        """The split's image sources (directories, image-list files), the YAML's class
        names and the dataset root."""
        yaml_path = root if root.suffix in (".yaml", ".yml") else None
        if yaml_path is None:
            for name in ("data.yaml", "dataset.yaml"):
                if (root / name).is_file():
                    yaml_path = root / name
                    break
        if yaml_path is None:
            return [root / "images" / split], None, root
        data = read_data_yaml(yaml_path)
        # joining an absolute path: keeps it; a relative one: relative to the YAML's folder
        base = yaml_path.parent / str(data["path"]) if data.get("path") else yaml_path.parent
        names = names_from_yaml(data["names"], yaml_path) if "names" in data else None
        entry = data.get(split)
        if entry is None:
            if yaml_path == root:
                raise ValueError(f"{yaml_path}: no entry for split '{split}'")
            return [root / "images" / split], names, root
        entries = entry if isinstance(entry, list) else [entry]
        if not entries:
            raise ValueError(f"{yaml_path}: split '{split}' is an empty list")
        return [split_path(base, e, yaml_path) for e in entries], names, base

    def _source_images(self, source: Path, base: Path) -> list[Path]:
        if source.is_dir():
            return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if source.suffix == ".txt":
            if not source.is_file():
                raise FileNotFoundError(f"YOLO image list not found: {source}")
            return read_image_list(source, base)
        raise FileNotFoundError(f"YOLO image directory not found: {source}")

    def _label_path(self, image: Path) -> Path:
        return (labels_counterpart(image) or image).with_suffix(".txt")

    def _orphan_labels(self, sources: list[Path], files: list[Path]) -> list[Path]:
        """Label files in the label directories of the image directories that match no
        image (image lists may share their folders with other splits: not checked)."""
        expected = {self._label_path(p) for p in files}
        orphans = []
        for source in sources:
            label_dir = labels_counterpart(source) if source.is_dir() else None
            if label_dir is None or not label_dir.is_dir():
                continue
            orphans += sorted(
                p
                for p in label_dir.rglob("*.txt")
                if p not in expected and p.name not in NOT_LABEL_FILES
            )
        return orphans

    def _warn_label_fixes(self, source: str, sources: list[Path], files: list[Path]) -> None:
        """One warning counting what the label files needed: nothing is changed silently."""
        notes = []
        if self._label_counts["polygons"]:
            notes.append(
                f"converted {self._label_counts['polygons']} polygon label(s) to their box"
            )
        if self._label_counts["duplicates"]:
            notes.append(f"dropped {self._label_counts['duplicates']} duplicate label row(s)")
        orphans = self._orphan_labels(sources, files)
        if orphans:
            notes.append(f"{len(orphans)} label file(s) have no image, e.g. {orphans[0]}")
        if notes:
            warnings.warn(f"{source}: {'; '.join(notes)}", stacklevel=3)

    def _record(self, number: int, image: Path) -> ImageRecord:
        rows = parse_yolo_labels(
            self._label_path(image), len(self.class_names), self.class_names, self._label_counts
        )
        try:
            width, height = read_image_size(image)
        except FileNotFoundError:
            width, height = 0, 0  # an image list's entry: _set_records counts the missing
        except ValueError:
            if not self.skip_bad_images:
                raise
            width, height = 0, 0
        boxes = cxcywh_norm_to_xyxy(rows[:, 1:], width, height)
        return self._make_record(
            number, image, self._file_name(image), (width, height), boxes, rows[:, 0]
        )

    def _file_name(self, image: Path) -> str:
        try:
            return str(image.relative_to(self.image_dir))
        except ValueError:  # an image list naming a file outside the dataset root
            return str(image)
