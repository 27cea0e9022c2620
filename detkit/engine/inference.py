"""Running a detector over a dataset and writing what it found as COCO results."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from detkit.engine.module import to_original_pixels
from detkit.structures import xyxy_to_xywh


@torch.inference_mode()
def run_detector(
    model: nn.Module, dataset: Dataset, batch_size: int = 8, num_workers: int = 0
) -> list[tuple[dict, dict]]:
    """``(target, detections)`` per image, both in the original image's pixels."""
    from detkit.data import collate

    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
    )
    pairs = []
    for images, targets in loader:
        detections = model(images.to(device)).detections
        detections = [{k: v.cpu() for k, v in d.items()} for d in detections]
        detections, targets = to_original_pixels(detections, targets)
        pairs.extend(zip(targets, detections, strict=True))
    return pairs


def coco_results(pairs: list[tuple[dict, dict]], dataset) -> list[dict]:
    """COCO results JSON entries (``xywh`` boxes, dataset category ids) for ``pairs``.

    Width and height are taken in float64 from the float32 corners (exactly, with no second
    rounding), as :class:`detkit.eval.DetectionMetric` takes them: validation during
    training and these results score the same boxes.
    """
    category_ids = list(dataset.label_to_category_id)
    results = []
    for target, det in pairs:
        image_id = int(target["image_id"])
        xywh = xyxy_to_xywh(det["boxes"].float().double()).tolist()
        for box, score, label in zip(
            xywh, det["scores"].tolist(), det["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": category_ids[label],
                    "bbox": box,
                    "score": score,
                }
            )
    return results
