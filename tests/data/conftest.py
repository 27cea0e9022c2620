"""Fixtures writing small datasets in each supported format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# 12 saturated colours far from the grey fills (114, ImageNet mean) and from black
COLOURS = [
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 0, 128), (128, 255, 0), (0, 255, 128),
]  # fmt: skip


@pytest.fixture
def colours() -> list[tuple[int, int, int]]:
    """The colour of label k (used by the box/pixel consistency checks)."""
    return COLOURS


def rectangles_image(height: int, width: int, boxes: list, colours: list) -> np.ndarray:
    """Black image with filled rectangles ``boxes`` (xyxy ints) in ``colours``."""
    image = np.zeros((height, width, 3), np.uint8)
    for (x1, y1, x2, y2), colour in zip(boxes, colours, strict=True):
        image[y1:y2, x1:x2] = colour
    return image


@pytest.fixture
def coco_dir(tmp_path: Path) -> tuple[Path, Path, dict]:
    """4 images (different sizes) with 3 coloured rectangles each; label k = colour k."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rng = np.random.default_rng(0)
    data = {"images": [], "annotations": [], "categories": []}
    data["categories"] = [{"id": 10 + k, "name": f"c{k}"} for k in range(12)]
    for i in range(4):
        height, width = (120, 160) if i % 2 else (150, 110)
        boxes = []
        for j in range(3):  # non-overlapping horizontal bands
            y1 = 5 + j * (height // 3)
            x1 = int(rng.integers(0, width // 3))
            boxes.append((x1, y1, x1 + int(rng.integers(20, width // 2)), y1 + height // 3 - 10))
        colours = [COLOURS[3 * i + j] for j in range(3)]
        name = f"img{i}.png"
        Image.fromarray(rectangles_image(height, width, boxes, colours)).save(image_dir / name)
        data["images"].append({"id": 100 + i, "file_name": name, "width": width, "height": height})
        for j, (x1, y1, x2, y2) in enumerate(boxes):
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": 100 + i,
                    "category_id": 10 + 3 * i + j,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return image_dir, ann, data
