"""Pascal VOC devkit-layout datasets (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detkit.data.datasets.base import DetectionDataset, ImageRecord, read_image_size

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


@dataclass
class _VOCObject:
    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass
class _VOCAnnotation:
    filename: str | None
    size: tuple[int, int] | None
    objects: list[_VOCObject]


def _number(node: ET.Element, tag: str, path: Path) -> float:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"{path}: <{node.tag}> is missing <{tag}>")
    try:
        return float(child.text.strip())
    except ValueError:
        raise ValueError(f"{path}: <{tag}> is not a number: {child.text!r}") from None


_FLAG_WORDS = {"": False, "false": False, "no": False, "true": True, "yes": True}


def _flag(text: str | None, tag: str, path: Path) -> bool:
    """A VOC 0/1 flag; also written as 0.0/1.0 or true/false by converters. Anything else is
    an error naming the file: it would silently move an object in or out of the positives."""
    word = (text or "").strip().lower()
    if word in _FLAG_WORDS:
        return _FLAG_WORDS[word]
    try:
        value = float(word)
    except ValueError:
        value = None
    if value not in (0.0, 1.0):
        raise ValueError(f"{path}: <{tag}> is {text!r}, expected 0 or 1")
    return value == 1.0


def parse_voc_xml(path: Path) -> _VOCAnnotation:
    """Parse one VOC annotation file; problems raise ValueError naming the file.

    VOC pixel indices are 1-based and inclusive, so ``xmin``/``ymin`` shift by -1 to give
    continuous 0-based ``xyxy`` coordinates (the Detectron2 convention).
    """
    if not path.is_file():
        raise FileNotFoundError(f"VOC annotation file not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: malformed XML: {err}") from None
    if root.tag != "annotation":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    filename = root.findtext("filename")
    size = None
    size_node = root.find("size")
    if size_node is not None and size_node.find("width") is not None:
        width, height = _number(size_node, "width", path), _number(size_node, "height", path)
        if width > 0 and height > 0:
            size = (int(width), int(height))
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{path}: an <object> has no <name>")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise ValueError(f"{path}: object '{name}' has no <bndbox>")
        x1, y1, x2, y2 = (_number(bnd, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        difficult = _flag(obj.findtext("difficult"), "difficult", path)
        objects.append(_VOCObject(name, (x1 - 1, y1 - 1, x2, y2), difficult))
    return _VOCAnnotation(filename.strip() if filename else None, size, objects)


class VOCDetection(DetectionDataset):
    """A VOC devkit-layout dataset.

    ``class_names``: the label order; ``None`` discovers the names in the split's XML files
    (sorted). ``use_difficult=False`` leaves difficult boxes out of the training targets;
    :meth:`to_coco` always keeps them, flagged ``difficult``/``ignore``. Images may be .jpg or
    .png; the XML's ``<filename>`` wins over the id when that file exists (else the id-named
    image is used, counted in one warning).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "trainval",
        class_names: Sequence[str] | None = None,
        transforms: Callable | None = None,
        use_difficult: bool = True,
        skip_bad_images: bool = False,
        cache_images: bool = False,
        image_dir: str = "JPEGImages",
    ):
        super().__init__(
            transforms=transforms, skip_bad_images=skip_bad_images, cache_images=cache_images
        )
        self.root = Path(root)
        self.split = split
        self.use_difficult = use_difficult
        self.image_dir = self.root / image_dir
        ids = self._read_split()
        parsed = [(i, parse_voc_xml(self.root / "Annotations" / f"{i}.xml")) for i in ids]
        if class_names is None:
            class_names = sorted({o.name for _, ann in parsed for o in ann.objects})
        self.class_names = [str(n) for n in class_names]
        self.label_to_category_id = list(range(1, len(self.class_names) + 1))
        label_of = {n: k for k, n in enumerate(self.class_names)}
        records = [
            self._record(k + 1, image_id, ann, label_of) for k, (image_id, ann) in enumerate(parsed)
        ]
        self._set_records(records, source=f"VOC {self.root} split '{split}'")

    def _read_split(self) -> list[str]:
        split_file = self.root / "ImageSets" / "Main" / f"{self.split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"VOC split file not found: {split_file}")
        # utf-8-sig: a byte-order mark (Windows editors) would otherwise start the first id
        lines = split_file.read_text(encoding="utf-8-sig").splitlines()
        return [line.split()[0] for line in lines if line.strip()]

    def _image_path(self, image_id: str, filename: str | None) -> Path:
        """``<filename>`` if that file exists, else the image named after the id (any of
        the usual extensions): converters often write a wrong extension or none. Such
        fallbacks are counted for one warning; with neither, the path named is returned
        for the missing-image error."""
        named = self.image_dir / filename if filename else None
        if named is not None and named.is_file():
            return named
        for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG"):
            candidate = self.image_dir / f"{image_id}{ext}"
            if candidate.is_file():
                if named is not None:
                    self._image_fallbacks.append((filename, candidate))
                return candidate
        return named if named is not None else self.image_dir / f"{image_id}.jpg"

    def _record(
        self, number: int, image_id: str, ann: _VOCAnnotation, label_of: dict[str, int]
    ) -> ImageRecord:
        xml = self.root / "Annotations" / f"{image_id}.xml"
        unknown = sorted({o.name for o in ann.objects} - set(label_of))
        if unknown:
            raise ValueError(f"{xml}: unknown class name(s) {unknown}; known: {list(label_of)}")
        path = self._image_path(image_id, ann.filename)
        size = ann.size
        if size is None:
            size = read_image_size(path) if path.is_file() else (0, 0)
        boxes = np.array([o.box for o in ann.objects], dtype=np.float32).reshape(-1, 4)
        labels = np.array([label_of[o.name] for o in ann.objects], dtype=np.int64)
        difficult = np.array([o.difficult for o in ann.objects], dtype=bool)
        source = f"{xml} <size>" if ann.size is not None else "its header"
        return self._make_record(
            number, path, path.name, size, boxes, labels, difficult=difficult, size_source=source
        )

    def target_mask(self, record: ImageRecord) -> np.ndarray:
        if self.use_difficult:
            return np.ones(len(record.labels), dtype=bool)
        return ~record.difficult
