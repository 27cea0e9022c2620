"""``detkit predict``: detections drawn on images, and written as JSON in original pixels."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import numpy as np
import torch

from detkit.config import safe_instantiate
from detkit.data.datasets.base import load_rgb
from detkit.engine.draw import draw_detections
from detkit.engine.inference import load_inference_model, run_detector
from detkit.errors import UserError
from detkit.files import atomic_path, write_json
from detkit.options import number, positive_int

log = logging.getLogger("detkit")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def find_images(source: str | Path) -> list[Path]:
    """The image files named by ``source``: one file, a folder's images (its top level only:
    a warning counts those in sub-folders), or a glob pattern (``**`` reaches sub-folders)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_image(p))
        _warn_unread_subfolders(path)
    else:
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True))
        files = [p for p in files if _is_image(p)]
    if not files:
        raise UserError(
            f"source={source} names no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _warn_unread_subfolders(folder: Path) -> None:
    """Images below a folder's top level are not read; say so rather than skip them unseen."""
    unread = [p for p in folder.glob("*/**/*") if _is_image(p)]
    if unread:
        folders = {p.relative_to(folder).parts[0] for p in unread}
        log.warning(
            "source=%s: %d images in %d sub-folders not read (only its top level is); "
            "source='%s/**/*' reads them too",
            folder,
            len(unread),
            len(folders),
            folder,
        )


def check_options(score_threshold, batch_size, max_images) -> None:
    """The options of ``detkit predict``, each refused in one line naming it."""
    number(score_threshold, "score_threshold", 0, 1)
    positive_int(batch_size, "batch_size")
    positive_int(max_images, "max_images", optional=True)


def drawing_names(files: list[Path]) -> list[str]:
    """A distinct ``<stem>.png`` per file: ``a.jpg`` and ``a.png``, or two ``a.png`` from
    different folders, would draw over each other; later ones become ``<stem>_<n>.png``.
    Compared case-blind, as some file systems are."""
    taken, names = set(), []
    for path in files:
        name, n = f"{path.stem}.png", 0
        while name.lower() in taken:
            n += 1
            name = f"{path.stem}_{n}.png"
        taken.add(name.lower())
        names.append(name)
    return names


@torch.inference_mode()
def predict_images(
    ckpt: str | Path,
    source: str | Path,
    output_dir: Path,
    score_threshold: float = 0.3,
    batch_size: int = 8,
    max_images: int | None = None,
    fuse_conv_bn: bool = True,
) -> list[dict]:
    """Run a checkpoint on images; write ``<stem>.png`` with boxes drawn (see
    :func:`drawing_names`) and ``detections.json``.

    ``fuse_conv_bn`` folds BatchNorms into their convolutions and merges parallel ones first
    (:func:`detkit.models.fuse.fuse_for_inference`: faster; the same detections up to float
    rounding)."""
    check_options(score_threshold, batch_size, max_images)
    # a checkpoint, or model.onnx + its sidecar
    model, config = load_inference_model(ckpt, fuse_conv_bn=fuse_conv_bn)
    transforms = safe_instantiate(config.transforms.eval, source=str(ckpt))
    class_names = list(config.data.get("class_names") or range(config.data.num_classes))
    files = find_images(source)[:max_images]
    drawings = [output_dir / name for name in drawing_names(files)]
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(files), batch_size):
        chunk = slice(start, start + batch_size)
        originals = [load_rgb(path) for path in files[chunk]]
        detections = _detect(model, transforms, originals)
        for path, drawn, original, det in zip(
            files[chunk], drawings[chunk], originals, detections, strict=True
        ):
            keep = det["scores"] >= score_threshold
            boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
            names = [str(class_names[int(i)]) for i in labels]
            with atomic_path(drawn) as tmp:
                draw_detections(original, boxes, labels, names, scores).save(tmp, format="PNG")
            written.append(
                {
                    "file": str(path),
                    "drawn": str(drawn),
                    "detections": [
                        {"box": box, "score": score, "label": int(label), "class_name": name}
                        for box, score, label, name in zip(
                            boxes.tolist(), scores.tolist(), labels.tolist(), names, strict=True
                        )
                    ],
                }
            )
    write_json(output_dir / "detections.json", written, indent=1)
    log.info("drew detections on %d images in %s", len(written), output_dir)
    return written


def _detect(model, transforms, originals: list[np.ndarray]) -> list[dict]:
    """Detections per image in its file's pixels, run as evaluation runs them: each image's
    own size goes with the padded batch, so its boxes (and Faster R-CNN's proposals) are
    clipped to that image, not to the largest one of its batch."""
    items = []
    for image in originals:
        tensor = _prepare(transforms, image)
        # The target run_detector reads: no boxes, the sizes that place the detections.
        target = {
            "boxes": torch.zeros(0, 4),
            "size": torch.tensor(tensor.shape[-2:]),
            "orig_size": torch.tensor(image.shape[:2]),
        }
        items.append((tensor, target))
    return [det for _, det in run_detector(model, items, batch_size=len(items))]


def _prepare(transforms, image: np.ndarray) -> torch.Tensor:
    """The eval pipeline (the checkpoint's own) applied to an image with no boxes."""
    no_boxes = np.zeros((0, 4), np.float32)
    tensor, _, _ = transforms(image, no_boxes, np.zeros(0, np.int64), extra=[])
    return tensor
