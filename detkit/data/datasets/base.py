"""The shared machinery of every detkit dataset: records, sanitising, loading, to_coco()."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from detkit.data.boxes import sanitize_boxes, xyxy_to_xywh


@dataclass
class ImageRecord:
    """One image's annotations, boxes in ``xyxy`` pixels of the file as shown upright (EXIF
    orientation applied, see :func:`load_rgb`), sanitised."""

    image_id: int
    path: Path
    file_name: str
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] float32
    labels: np.ndarray  # [N] int64, 0..C-1
    iscrowd: np.ndarray  # [N] bool
    difficult: np.ndarray  # [N] bool
    # where width/height came from, named when the decoded file disagrees ("" = the records)
    size_source: str = ""


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# 16-bit modes (PNG, TIFF); PIL's convert("RGB") clips their values at 255 (white images)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (0x0112, or XMP's tiff:Orientation), 1 when absent.

    Read from the metadata before the pixel data only: PNG's own ``getexif()`` decodes the
    whole file to look for an eXIf chunk after the pixels, which a header read must not do,
    and the header size and the decoded image must agree on the orientation.
    """
    orientation = Image.Image.getexif(img).get(0x0112, 1)
    return orientation if orientation in _ORIENTATION_TRANSPOSE else 1


def _too_large(path: Path, err: Image.DecompressionBombError) -> ValueError:
    # PIL's message gives the declared pixel count and the limit it refuses above
    return ValueError(
        f"cannot read image {path}: {str(err).rstrip('.')} (PIL refuses images above twice "
        "PIL.Image.MAX_IMAGE_PIXELS; raise that if the file is genuine)"
    )


def read_image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` as shown upright, from the file header only (no pixel decoding).

    The EXIF orientation is applied as :func:`load_rgb` applies it: orientations 5-8 (a
    rotation by 90 degrees) swap the stored width and height, since viewers, annotation
    tools and :func:`load_rgb` show the rotated image. Errors (missing, unreadable or
    decompression-bomb sized files) raise one line naming the file.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            return (height, width) if _orientation(img) >= 5 else (width, height)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit pixels are scaled (value >> 8), not clipped at 255."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "I":
        # PIL opens 16-bit PNGs as I;16 or I: mode I is taken as 0..65535 like them
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray((values >> 8).astype(np.uint8))
    elif img.mode == "F":
        # float pixels have no agreed range (0..1, 0..255, depths in metres)
        raise ValueError(
            "32-bit float pixels (PIL mode F) have no standard 0-255 scale; "
            "save the image as 8- or 16-bit"
        )
    return img.convert("RGB")


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file as ``uint8 [H, W, 3]`` RGB, shown upright; errors name the file.

    The EXIF orientation is applied (as ``PIL.ImageOps.exif_transpose`` does): a file
    stored 200x100 with orientation 6 gives a 100x200 image, the view that viewers and
    annotation tools show and that :func:`read_image_size` reports. 16-bit images are
    scaled to 8 bits (``value >> 8``); 32-bit float images are refused.
    """
    try:
        with Image.open(path) as img:
            orientation = _orientation(img)
            rgb = _to_rgb(img)
            if orientation != 1:
                rgb = rgb.transpose(_ORIENTATION_TRANSPOSE[orientation])
            return np.asarray(rgb)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as err:
        raise _too_large(path, err) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from None


class DetectionDataset(Dataset):
    """Base class: subclasses parse their format into :class:`ImageRecord` objects and call
    :meth:`_set_records`; this class loads, transforms and exports them.

    Items are ``(image float32 [3, H, W] in [0, 1], target)`` with ``target`` holding
    ``boxes`` (xyxy pixels of the returned image), ``labels``, ``image_id``, ``orig_size``
    (h, w of the file shown upright), ``size`` (h, w of the returned image before batch
    padding) and the ``iscrowd``/``difficult`` flags.
    """

    class_names: list[str]
    label_to_category_id: list[int]

    def __init__(
        self,
        transforms: Callable | None = None,
        skip_bad_images: bool = False,
        cache_images: bool = False,
    ):
        self.transforms = transforms
        self.skip_bad_images = skip_bad_images
        # Decoded images kept in memory after their first load (H x W x 3 bytes each, in
        # every loader process): PNG/JPEG decoding is a large part of a CPU data pipeline,
        # and YOLO's mosaic decodes four images per sample.
        self.cache_images = bool(cache_images)
        self._image_cache: dict[int, np.ndarray] = {}
        self.records: list[ImageRecord] = []
        self._box_counts = {"clipped": 0, "dropped": 0}
        self._bad_images: set[str] = set()
        # (file name the annotation gave, file used instead), reported by _set_records
        self._image_fallbacks: list[tuple[str, Path]] = []
        self._rng = np.random.default_rng()

    # ----- building -------------------------------------------------------------------
    def _make_record(
        self,
        image_id: int,
        path: Path,
        file_name: str,
        size: tuple[int, int],
        boxes: np.ndarray,
        labels: np.ndarray,
        iscrowd: np.ndarray | None = None,
        difficult: np.ndarray | None = None,
        size_source: str = "",
    ) -> ImageRecord:
        """Clip boxes to the image, drop empty ones (counted for one warning later).

        ``size_source`` says where ``size`` came from (e.g. the annotation file) for the
        error raised when the decoded image turns out to have another size."""
        width, height = size
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        n = len(labels)
        iscrowd = np.zeros(n, bool) if iscrowd is None else np.asarray(iscrowd, bool)
        difficult = np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool)
        if width <= 0 or height <= 0:
            # Size unknown: the image is missing or unreadable, and _set_records refuses or
            # skips the record. Clipping to a 0 x 0 image would count its boxes as dropped.
            clipped = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            keep = np.ones(len(clipped), bool)
        else:
            clipped, info = sanitize_boxes(boxes, width, height)
            self._box_counts["clipped"] += info["clipped"]
            self._box_counts["dropped"] += info["dropped"]
            keep = info["keep"]
        return ImageRecord(
            image_id=int(image_id),
            path=Path(path),
            file_name=file_name,
            width=int(width),
            height=int(height),
            boxes=clipped[keep],
            labels=labels[keep],
            iscrowd=iscrowd[keep],
            difficult=difficult[keep],
            size_source=size_source,
        )

    def _set_records(self, records: list[ImageRecord], source: str) -> None:
        """Install the parsed records: report fixed boxes once, check the image files."""
        clipped, dropped = self._box_counts["clipped"], self._box_counts["dropped"]
        if clipped or dropped:
            warnings.warn(
                f"{source}: clipped {clipped} box(es) to their image and dropped {dropped} "
                "zero-area, inverted or out-of-image box(es)",
                stacklevel=3,
            )
        if self._image_fallbacks:
            named, used = self._image_fallbacks[0]
            warnings.warn(
                f"{source}: {len(self._image_fallbacks)} annotation(s) name an image file that "
                f"does not exist; used the image named after the annotation instead, e.g. "
                f"{named!r} -> {used}",
                stacklevel=3,
            )
        # width 0 marks an image whose header could not be read (skip_bad_images mode)
        missing = [r for r in records if r.width <= 0 or not r.path.is_file()]
        if missing and not self.skip_bad_images:
            if missing[0].path.is_file():
                raise ValueError(f"{source}: cannot read image {missing[0].path}")
            raise FileNotFoundError(
                f"{source}: image file not found: {missing[0].path} "
                f"({len(missing)} of {len(records)} images missing; "
                "pass skip_bad_images=True to skip them)"
            )
        if missing:
            warnings.warn(
                f"{source}: skipped {len(missing)} missing or unreadable image(s), "
                f"e.g. {missing[0].path}",
                stacklevel=3,
            )
            lost = {id(r) for r in missing}
            records = [r for r in records if id(r) not in lost]
        self.records = records
        self.source = source

    # ----- access ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def reseed(self, seed: int) -> None:
        """Reseed this dataset's random choices and its transforms (one call per worker)."""
        self._rng = np.random.default_rng(seed)
        if hasattr(self.transforms, "set_random_seed"):
            self.transforms.set_random_seed(seed)

    def close_augmentation(self, closed: bool = True) -> None:
        """Switch the transforms' strong augmentations off (``closed``) or on again; see
        :meth:`detkit.data.transforms.DetectionTransform.close_augmentation`."""
        close = getattr(self.transforms, "close_augmentation", None)
        if close is None:
            raise ValueError(
                f"{self.source}: its transforms ({type(self.transforms).__name__}) cannot "
                "close their augmentation (build them with detkit.data.transforms)"
            )
        close(closed)

    def load_raw(self, index: int) -> tuple[np.ndarray, ImageRecord]:
        """The decoded file (``uint8 [H, W, 3]``) and its record; bad files (unreadable, or
        not of their record's size) are skipped (substituted by the next good one) when
        ``skip_bad_images`` is set, else raise ValueError naming the file. With
        ``cache_images`` the decoded file is kept and later calls return a copy of it."""
        for step in range(len(self.records)):
            position = (index + step) % len(self.records)
            record = self.records[position]
            cached = self._image_cache.get(position)
            if cached is not None:
                return cached.copy(), record  # a copy: transforms may write in place
            try:
                image = load_rgb(record.path)
                self._check_size(image, record)
                if self.cache_images:
                    self._image_cache[position] = image
                    image = image.copy()
                return image, record
            except (FileNotFoundError, ValueError) as err:
                if not self.skip_bad_images:
                    raise
                if str(record.path) not in self._bad_images:
                    self._bad_images.add(str(record.path))
                    warnings.warn(
                        f"{self.source}: skipped {len(self._bad_images)} bad image(s) so far; "
                        f"latest: {err}",
                        stacklevel=2,
                    )
        raise ValueError(f"{self.source}: no readable image left")

    def _check_size(self, image: np.ndarray, record: ImageRecord) -> None:
        """Refuse a file whose size is not its record's: boxes were clipped to the recorded
        frame and evaluation maps predictions back to it, so both would be silently wrong."""
        height, width = image.shape[:2]
        if (width, height) != (record.width, record.height):
            source = record.size_source or f"its record in {self.source}"
            raise ValueError(
                f"image {record.path} is {width}x{height} (width x height, after EXIF "
                f"orientation) but {source} gives {record.width}x{record.height}"
            )

    def target_mask(self, record: ImageRecord) -> np.ndarray:
        """Which of a record's boxes go into training targets (all, unless overridden)."""
        return np.ones(len(record.labels), dtype=bool)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if not 0 <= index < len(self.records):
            if -len(self.records) <= index < 0:
                index += len(self.records)
            else:
                raise IndexError(f"index {index} out of range for {len(self.records)} images")
        image, record = self.load_raw(index)
        if self.transforms is None:
            boxes, labels, crowd, difficult = self._annotations(record)
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            tensor = tensor.float().div_(255.0)
        else:
            tensor, boxes, labels, crowd, difficult = self._transform(image, record)
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "image_id": record.image_id,
            "orig_size": torch.tensor([record.height, record.width]),
            "size": torch.tensor(list(tensor.shape[-2:])),
            "iscrowd": torch.as_tensor(crowd, dtype=torch.bool),
            "difficult": torch.as_tensor(difficult, dtype=torch.bool),
        }
        return tensor, target

    def _annotations(self, record: ImageRecord) -> tuple[np.ndarray, ...]:
        keep = self.target_mask(record)
        return record.boxes[keep], record.labels[keep], record.iscrowd[keep], record.difficult[keep]

    def _transform(self, image: np.ndarray, record: ImageRecord) -> tuple:
        """Run the transforms; box ids carry labels and flags through drops and mosaics."""
        boxes, labels, crowd, difficult = self._annotations(record)
        extra, all_labels, all_crowd, all_diff = [], [labels], [crowd], [difficult]
        offset = len(labels)
        wants = getattr(self.transforms, "num_extra_samples", None)
        for _ in range(wants() if wants else 0):
            other_image, other = self.load_raw(int(self._rng.integers(len(self.records))))
            o_boxes, o_labels, o_crowd, o_diff = self._annotations(other)
            ids = np.arange(offset, offset + len(o_labels))
            extra.append({"image": other_image, "boxes": o_boxes, "box_ids": ids})
            all_labels.append(o_labels)
            all_crowd.append(o_crowd)
            all_diff.append(o_diff)
            offset += len(o_labels)
        ids = np.arange(len(labels))
        tensor, out_boxes, out_ids = self.transforms(image, boxes, ids, extra=extra)
        pick = np.asarray(out_ids, dtype=np.int64)
        return (
            tensor,
            out_boxes,
            np.concatenate(all_labels)[pick],
            np.concatenate(all_crowd)[pick],
            np.concatenate(all_diff)[pick],
        )

    # ----- export ---------------------------------------------------------------------
    def to_coco(self) -> dict[str, Any]:
        """Ground truth as a COCO dict in the ORIGINAL image pixels, whatever the transforms.

        VOC ``difficult`` boxes carry ``"difficult": 1`` and ``"ignore": 1``.
        """
        images, annotations = [], []
        for record in self.records:
            images.append(
                {
                    "id": record.image_id,
                    "file_name": record.file_name,
                    "width": record.width,
                    "height": record.height,
                }
            )
            xywh = xyxy_to_xywh(record.boxes)
            for box, label, crowd, diff in zip(
                xywh, record.labels, record.iscrowd, record.difficult, strict=True
            ):
                ann = {
                    "id": len(annotations) + 1,
                    "image_id": record.image_id,
                    "category_id": int(self.label_to_category_id[int(label)]),
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(crowd),
                }
                if diff:
                    ann["difficult"] = 1
                    ann["ignore"] = 1
                annotations.append(ann)
        categories = [
            {"id": int(cid), "name": name}
            for cid, name in zip(self.label_to_category_id, self.class_names, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}

    def coco_ground_truth(self) -> dict[str, Any]:
        """The ground truth evaluation scores against, as a COCO dict in the file's pixels.

        Datasets read from a COCO annotation file return that file as written (its ``area``,
        ``iscrowd``, ``ignore`` and unsanitised boxes), so scores are the official ones;
        the others return :meth:`to_coco`.
        """
        return self.to_coco()

    @property
    def num_classes(self) -> int:
        """Number of object classes ``C``."""
        return len(self.class_names)
