"""Running a detector over a dataset and writing what it found as COCO results.

A detector here is anything with the detector contract's ``predict_padded(images,
image_sizes)`` (detections in the batch's pixels): a PyTorch detector rebuilt from a
checkpoint, or an exported ``model.onnx`` run by ONNX Runtime
(:class:`detkit.export.OnnxDetector`); :func:`load_inference_model` opens either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from detkit.engine.checkpoint import load_detector, require_sections
from detkit.engine.module import to_original_pixels
from detkit.models.fuse import fuse_for_inference
from detkit.structures import target_sizes, unpad_detections, xyxy_to_xywh


def load_inference_model(path: str | Path, fuse_conv_bn: bool = False) -> tuple[object, DictConfig]:
    """``(detector, config)`` from a checkpoint or an exported ``.onnx`` model (with its
    sidecar); the config holds what evaluation and prediction read (``transforms.eval``,
    ``data``). A checkpoint trained with ``channels_last: true`` runs in that layout here
    too (its convolutions then give NHWC maps whatever the input's layout).

    ``fuse_conv_bn`` folds BatchNorms into their convolutions and merges parallel
    convolutions (:func:`detkit.models.fuse.fuse_for_inference`): faster, equal up to float
    rounding. ONNX Runtime folds them itself."""
    if str(path).endswith(".onnx"):
        from detkit.export.onnx_runtime import load_onnx_detector

        return load_onnx_detector(path)
    model, config = load_detector(path)
    require_sections(config, f"checkpoint {path}", "transforms", "data")
    if fuse_conv_bn:
        fuse_for_inference(model)
    if config.get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    return model, config


def input_device(model) -> torch.device:
    """Where ``model`` wants its images: its own ``device`` when it names one (an ONNX
    Runtime detector), else where its parameters live (a PyTorch module)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.inference_mode()
def run_detector(
    model, dataset: Dataset, batch_size: int = 8, num_workers: int = 0
) -> list[tuple[dict, dict]]:
    """``(target, detections)`` per image, both in the original image's pixels. ``model`` is
    a PyTorch detector or an :class:`~detkit.export.OnnxDetector` (see module doc)."""
    from detkit.data import collate

    model.eval()
    device = input_device(model)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
    )
    pairs = []
    for images, targets in loader:
        # Each image's boxes clipped to its own size in the padded batch, as in validation.
        sizes = target_sizes(targets)
        padded = model.predict_padded(
            images.to(device), None if sizes is None else sizes.to(device)
        )
        detections = [{k: v.cpu() for k, v in d.items()} for d in unpad_detections(*padded)]
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
