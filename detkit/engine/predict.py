"""``detkit predict``: detections drawn on images, and written as JSON in original pixels."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import numpy as np
import torch

from detkit.config import safe_instantiate
from detkit.data import boxes_to_original, collate
from detkit.data.datasets.base import load_rgb
from detkit.engine.draw import draw_detections
from detkit.engine.inference import load_inference_model
from detkit.errors import UserError
from detkit.files import atomic_path, write_json

log = logging.getLogger("detkit")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def find_images(source: str | Path) -> list[Path]:
    """The image files named by ``source``: one file, a folder's images, or a glob pattern."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = sorted(Path(p) for p in glob.glob(str(source), recursive=True))
        files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise UserError(
            f"source={source} names no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


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
    """Run a checkpoint on images; write ``<name>.png`` with boxes drawn and ``detections.json``.

    ``fuse_conv_bn`` folds BatchNorms into their convolutions first (faster; the same
    detections up to float rounding)."""
    # a checkpoint, or model.onnx + its sidecar
    model, config = load_inference_model(ckpt, fuse_conv_bn=fuse_conv_bn)
    transforms = safe_instantiate(config.transforms.eval, source=str(ckpt))
    class_names = list(config.data.get("class_names") or range(config.data.num_classes))
    files = find_images(source)[:max_images]
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        originals = [load_rgb(path) for path in chunk]
        inputs = [_prepare(transforms, image) for image in originals]
        images, _ = collate([(tensor, {}) for tensor in inputs])
        detections = model(images).detections
        for path, original, tensor, det in zip(chunk, originals, inputs, detections, strict=True):
            keep = det["scores"] >= score_threshold
            boxes = boxes_to_original(det["boxes"][keep], tensor.shape[-2:], original.shape[:2])
            scores, labels = det["scores"][keep], det["labels"][keep]
            names = [str(class_names[int(i)]) for i in labels]
            drawn = output_dir / f"{path.stem}.png"
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


def _prepare(transforms, image: np.ndarray) -> torch.Tensor:
    """The eval pipeline (the checkpoint's own) applied to an image with no boxes."""
    no_boxes = np.zeros((0, 4), np.float32)
    tensor, _, _ = transforms(image, no_boxes, np.zeros(0, np.int64), extra=[])
    return tensor
