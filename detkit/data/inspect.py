"""Looking at datasets: a grid of samples with their boxes, class and box-size statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from detkit.data.datasets.base import DetectionDataset
from detkit.files import atomic_path

PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def draw_boxes(image: torch.Tensor, target: dict, class_names: list[str]) -> Image.Image:
    """The image tensor as a PIL image with its boxes and class names drawn."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    canvas = Image.fromarray(array)
    pen = ImageDraw.Draw(canvas)
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
        colour = PALETTE[label % len(PALETTE)]
        pen.rectangle(box, outline=colour, width=2)
        name = class_names[label] if label < len(class_names) else str(label)
        pen.text((box[0] + 2, box[1] + 1), name, fill=colour)
    return canvas


def browse_grid(
    dataset: DetectionDataset, n: int = 16, columns: int = 4, path: str | Path = "browse.png",
    seed: int = 0,
) -> Path:  # fmt: skip
    """Write a grid of ``n`` random samples (as the dataset returns them) with boxes drawn."""
    if len(dataset) == 0:
        raise ValueError("browse: the dataset is empty")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(dataset), size=min(n, len(dataset)), replace=False)
    tiles = [draw_boxes(*dataset[int(i)], dataset.class_names) for i in picks]
    cell_w = max(t.width for t in tiles)
    cell_h = max(t.height for t in tiles)
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (32, 32, 32))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % columns) * cell_w, (k // columns) * cell_h))
    path = Path(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path


def dataset_stats(dataset: DetectionDataset) -> dict:
    """Counts from the records (no image decoding): per-class boxes, box sizes in pixels."""
    labels = [r.labels for r in dataset.records]
    boxes = [r.boxes for r in dataset.records]
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    all_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    sides = np.sqrt(np.prod(all_boxes[:, 2:] - all_boxes[:, :2], axis=1))
    return {
        "images": len(dataset.records),
        "negatives": sum(len(lab) == 0 for lab in labels),
        "boxes": len(all_labels),
        "per_class": np.bincount(all_labels, minlength=dataset.num_classes).tolist(),
        "size_buckets": {  # COCO's small / medium / large by area
            "small (<32²)": int((sides < 32).sum()),
            "medium": int(((sides >= 32) & (sides < 96)).sum()),
            "large (>=96²)": int((sides >= 96).sum()),
        },
        "side_quantiles": {
            q: float(np.quantile(sides, q)) if len(sides) else 0.0 for q in (0.05, 0.5, 0.95)
        },
        "boxes_per_image_max": max((len(lab) for lab in labels), default=0),
    }


def print_stats(stats: dict, class_names: list[str]) -> None:
    """Print :func:`dataset_stats` output as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{stats['images']} images ({stats['negatives']} without objects), {stats['boxes']} "
        f"boxes, at most {stats['boxes_per_image_max']} per image"
    )
    classes = Table(title="boxes per class")
    classes.add_column("label", justify="right")
    classes.add_column("class")
    classes.add_column("boxes", justify="right")
    for label, count in enumerate(stats["per_class"]):
        classes.add_row(str(label), str(class_names[label]), str(count))
    console.print(classes)
    sizes = Table(title="box size (sqrt of area, pixels of the file)")
    sizes.add_column("bucket")
    sizes.add_column("boxes", justify="right")
    for name, count in stats["size_buckets"].items():
        sizes.add_row(name, str(count))
    for q, value in stats["side_quantiles"].items():
        sizes.add_row(f"quantile {q:.2f}", f"{value:.1f}")
    console.print(sizes)
