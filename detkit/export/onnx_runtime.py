"""An exported detector run by ONNX Runtime, called like a PyTorch detector.

``OnnxDetector(path)(images)`` takes a ``[B, 3, h, w]`` batch in ``[0, 1]`` and returns a
:class:`~detkit.structures.DetectorOutput` whose detections are in the pixels of that batch,
as a PyTorch detector's are; ``detkit predict`` and ``detkit eval`` run it in place of one.
Everything it needs comes from ``model.onnx`` and its ``model.json`` sidecar (no model code):
images smaller than the graph's fixed input are zero-padded at the bottom/right; larger ones
are first scaled down to fit (boxes are scaled back). Graphs exported with ``nms=false`` get
:func:`detkit.ops.multiclass_nms` with the thresholds recorded in the sidecar.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from detkit.config import config_from_file
from detkit.errors import UserError
from detkit.files import file_sha256
from detkit.ops import clip_boxes
from detkit.structures import DetectorOutput, unpad_detections


def read_sidecar(onnx_path: str | Path) -> dict:
    """The ``.json`` written next to ``model.onnx`` by ``detkit export``.

    It is data: its ``transforms`` and ``data`` (the training run's dataset) may only name
    allowed targets (:mod:`detkit.allowlist`) and nothing in it may be an interpolation, as
    for a checkpoint's config.
    """
    sidecar = Path(onnx_path).with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"{onnx_path} has no sidecar {sidecar} (class names, input size): export it with "
            "`detkit export`, which writes both"
        )
    try:
        info = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"sidecar {sidecar} is not valid JSON: {err}") from err
    if not isinstance(info, dict) or not str(info.get("format", "")).startswith("detkit-onnx/"):
        raise UserError(f"sidecar {sidecar} was not written by detkit export (no format tag)")
    config_from_file(info, f"sidecar {sidecar}")
    _check_sidecar_fields(info, f"sidecar {sidecar}")
    expected = info.get("graph_sha256")  # absent in sidecars written before it was recorded
    if expected is not None and Path(onnx_path).is_file() and file_sha256(onnx_path) != expected:
        raise UserError(
            f"sidecar {sidecar} was written for another graph than {onnx_path} (its SHA-256 "
            "differs): export again, or put the pair that was exported together back"
        )
    return info


def _check_sidecar_fields(info: dict, source: str) -> None:
    """The fields inference reads, with the types ``detkit export`` writes; one line naming
    the field otherwise (an edited sidecar must not fail deep inside, or silently)."""

    def fail(field: str, expected: str) -> None:
        raise UserError(f"{source}: {field} must be {expected}")

    names = info.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        fail("class_names", "a non-empty list of strings")
    if info.get("num_classes", len(names)) != len(names):
        fail("num_classes", f"the number of class_names ({len(names)})")
    data_names = (info.get("data") or {}).get("class_names")
    if data_names is not None and list(data_names) != names:
        fail("data.class_names", "absent or the same as class_names")
    size = (info.get("input") or {}).get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) for v in size)):
        fail("input.image_size", "[height, width] in pixels")
    for flag in ("nms", "dynamic_batch"):
        if not isinstance(info.get(flag), bool):
            fail(flag, "true or false")
    post = info.get("postprocess")
    if not isinstance(post, dict):
        fail("postprocess", "a mapping")
    for key in ("score_threshold", "iou_threshold"):
        if not isinstance(post.get(key), int | float) or isinstance(post.get(key), bool):
            fail(f"postprocess.{key}", "a number")
    if not _positive_int(post.get("max_detections")):
        fail("postprocess.max_detections", "a positive integer")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class OnnxDetector:
    """ONNX Runtime inference of a ``detkit export`` graph (see module doc)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        self.path = path
        self.info = read_sidecar(path)
        self.image_size = tuple(self.info["input"]["image_size"])
        self.class_names = list(self.info["class_names"])
        self.num_classes = len(self.class_names)
        try:
            self.session = ort.InferenceSession(
                str(path), providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime's own types: invalid protobuf, bad graph ...
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"ONNX model {path} cannot be loaded: {reason}") from None
        self._check_graph_classes()

    def _check_graph_classes(self) -> None:
        """A graph without NMS gives its class count in the scores' shape: it must be the
        sidecar's (with NMS the labels are checked as they come, in predict_padded)."""
        if self.info["nms"]:
            return
        outputs = self.session.get_outputs()
        classes = outputs[1].shape[-1] if len(outputs) > 1 and outputs[1].shape else None
        if isinstance(classes, int) and classes != self.num_classes:
            raise UserError(
                f"ONNX model {self.path} scores {classes} classes but its sidecar names "
                f"{self.num_classes}"
            )

    @property
    def device(self) -> torch.device:
        """Where inputs are expected: ONNX Runtime reads host memory (any tensor is copied)."""
        return torch.device("cpu")

    def eval(self) -> OnnxDetector:
        """No-op, for code written against ``nn.Module`` detectors."""
        return self

    def predict_padded(
        self, images: Tensor, image_sizes: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The detector contract (:mod:`detkit.models.detectors.one_stage`): padded
        ``(boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B])`` in the pixels
        of ``images``, boxes clipped to each image's ``image_sizes [B, 2]`` when given."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {list(images.shape)}")
        batch, scale = self.fit(images.float().cpu())
        if self.info["dynamic_batch"]:
            outputs = self.session.run(None, {"images": batch.numpy()})
        else:  # a fixed batch of 1: one run per image
            runs = [self.session.run(None, {"images": image[None].numpy()}) for image in batch]
            outputs = [np.concatenate(parts) for parts in zip(*runs, strict=True)]
        tensors = [torch.from_numpy(o) for o in outputs]
        boxes, scores, labels, num = tensors if self.info["nms"] else self.run_nms(*tensors)
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise UserError(
                f"ONNX model {self.path} gave class {int(labels.max())} but its sidecar names "
                f"{self.num_classes} classes"
            )
        boxes = boxes / scale
        if image_sizes is not None:
            boxes = clip_boxes(boxes, image_sizes.cpu())
        return boxes, scores, labels.long(), num

    def __call__(self, images: Tensor) -> DetectorOutput:
        return DetectorOutput(detections=unpad_detections(*self.predict_padded(images)))

    def fit(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The batch scaled down (if needed) and zero-padded to the graph's input size, and
        the ``[sx, sy, sx, sy]`` factors that took its pixels there (ones for a batch that
        fits, so boxes come back unchanged)."""
        height, width = self.image_size
        h, w = images.shape[-2:]
        scale = min(1.0, height / h, width / w)
        if scale < 1.0:
            size = (min(height, round(h * scale)), min(width, round(w * scale)))
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        # Per axis, from the sizes actually reached: rounding makes them differ slightly.
        sy, sx = images.shape[-2] / h, images.shape[-1] / w
        factors = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        h, w = images.shape[-2:]
        return F.pad(images, (0, width - w, 0, height - h)), factors

    def run_nms(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, ...]:
        """The NMS a ``nms=false`` graph leaves out, with the exported model's settings."""
        from detkit.ops import multiclass_nms

        s = self.info["postprocess"]
        return multiclass_nms(
            boxes,
            scores,
            s["score_threshold"],
            s["iou_threshold"],
            s["max_detections"],
            s.get("pre_nms_top_k"),
            per_class_top_k=s.get("per_class_top_k"),
        )


def load_onnx_detector(path: str | Path) -> tuple[OnnxDetector, DictConfig]:
    """``(detector, config)`` like :func:`detkit.engine.checkpoint.load_detector`: the config
    holds what ``detkit predict`` and ``detkit eval`` read (``transforms.eval``, and ``data``:
    the training run's dataset node recorded at export, with its ``class_names``).

    Without a recorded dataset (a model exported by :func:`~detkit.export.export_onnx` alone)
    ``data`` holds only the sidecar's class names: evaluating then needs ``data=``.
    """
    detector = OnnxDetector(path)
    transforms = detector.info.get("transforms") or {
        "_target_": "detkit.data.transforms.eval_resize",
        "size": list(detector.image_size),
    }
    data = detector.info.get("data")
    if not isinstance(data, dict):
        data = {"class_names": detector.class_names}
    # The recorded node keeps "class_names" absent when the run read them from its
    # annotation file: labels are then matched to a dataset's by count, as for the checkpoint.
    data = {**data, "num_classes": detector.num_classes}
    config = OmegaConf.create({"transforms": {"eval": transforms}, "data": data})
    return detector, config
