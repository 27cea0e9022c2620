"""Export wrappers: a detector's own parts recomposed into a traceable ``images -> tensors``
forward with a fixed image size, a dynamic batch and fixed-shape outputs.

Why wrappers: a detector's ``forward`` returns per-image lists of data-dependent length and
caches priors in Python dicts, neither of which an exported graph can hold. Each wrapper calls
the model's own modules (normalisation, backbone, neck, head, box coder, priors) so the model
code carries no export-only branch, and swaps the per-image post-processing for the batched
fixed-shape :func:`detkit.ops.multiclass_nms` (ONNX ``NonMaxSuppression`` when exported).

Outputs (``B`` dynamic, ``K = detections_per_image``, ``N`` candidates, ``C`` classes):

- ``nms=True``: ``boxes [B, K, 4]`` float32 xyxy input pixels, ``scores [B, K]``,
  ``labels [B, K]`` int64 in ``0..C-1`` and ``num_detections [B]`` int64; rows past
  ``num_detections`` are zeros.
- ``nms=False``: ``boxes [B, N, 4]`` (Faster R-CNN: class-specific ``[B, N, C, 4]``) and
  ``scores [B, N, C]`` (no background column), before any threshold or NMS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.ops import clip_boxes, multiclass_nms

NMS_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
RAW_OUTPUTS = ("boxes", "scores")


def family_of(model: nn.Module) -> str:
    """``"ssd"``, ``"yolo"`` or ``"faster_rcnn"`` from the detector's class (by name, so the
    export package never imports a detector module that is not needed)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for family, cls_name in (("ssd", "SSD"), ("yolo", "YOLO"), ("faster_rcnn", "FasterRCNN")):
        if cls_name in names:
            return family
    raise ValueError(
        f"cannot export a {type(model).__name__}: detkit exports SSD, YOLO and FasterRCNN"
    )


class ExportWrapper(nn.Module):
    """Base class: holds the detector and the fixed ``(h, w)`` the graph is built for."""

    family = ""

    def __init__(self, model: nn.Module, image_size: tuple[int, int], nms: bool = True) -> None:
        super().__init__()
        self.model = model.eval()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.nms = bool(nms)

    @property
    def output_names(self) -> tuple[str, ...]:
        return NMS_OUTPUTS if self.nms else RAW_OUTPUTS

    def nms_settings(self) -> dict:
        """Thresholds baked into the graph (written to the sidecar)."""
        return {}

    def dummy_features(self, run) -> list[Tensor]:
        """Feature maps of one zero image (their sizes fix the priors of the graph)."""
        with torch.no_grad():
            return list(run(torch.zeros(1, 3, *self.image_size, device=_device(self.model))))


class OneStageExport(ExportWrapper):
    """SSD and YOLO: decoded boxes and scores for every prior, clipped to the image, then
    ``multiclass_nms`` with the model's thresholds and its top-k rule (``top_k_rule``)."""

    top_k_rule = "per_class_top_k"

    def nms_settings(self) -> dict:
        m = self.model
        return {
            "score_threshold": m.score_threshold,
            "iou_threshold": m.nms_threshold,
            "max_detections": m.detections_per_image,
            self.top_k_rule: m.topk_candidates,
        }

    def finish(self, boxes: Tensor, scores: Tensor) -> tuple[Tensor, ...]:
        """Clipped ``(boxes, scores)``, or the padded ``multiclass_nms`` outputs."""
        boxes = clip_boxes(boxes, self.image_size)
        if not self.nms:
            return boxes, scores
        return multiclass_nms(boxes, scores, **self.nms_settings())


class SSDExport(OneStageExport):
    """SSD: normalise, backbone, head, softmax without background, decode against the default
    boxes (a buffer, computed once by the model's own prior generator), clip, NMS with
    SSD's per-class top-k rule."""

    family = "ssd"

    def __init__(self, model: nn.Module, image_size: tuple[int, int], nms: bool = True) -> None:
        super().__init__(model, image_size, nms)
        features = self.dummy_features(lambda x: model.backbone(model.normalize(x)))
        self.register_buffer("priors", model.priors(self.image_size, features).clone())

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        cls_logits, deltas = m.head(m.backbone(m.normalize(images)))
        scores = F.softmax(cls_logits.float(), dim=-1)[..., 1:]
        boxes = m.box_coder.decode(deltas.float(), self.priors.unsqueeze(0))
        return self.finish(boxes, scores)


class YOLOExport(OneStageExport):
    """YOLO (v1 and v3 heads): normalise, backbone, neck, head, the head's own ``decode``,
    clip, NMS with the model's per-image top-k."""

    family = "yolo"

    top_k_rule = "pre_nms_top_k"

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        raw = m.head(m.neck(m.backbone(m.normalize(images))))
        boxes, scores = m.head.decode(raw, self.image_size)
        return self.finish(boxes.float(), scores.float())


def export_wrapper(
    model: nn.Module, image_size: tuple[int, int], nms: bool = True
) -> ExportWrapper:
    """The export wrapper for ``model``'s family, in eval mode."""
    family = family_of(model)
    if family == "ssd":
        return SSDExport(model, image_size, nms).eval()
    if family == "yolo":
        return YOLOExport(model, image_size, nms).eval()
    from detkit.export.rcnn import FasterRCNNExport

    return FasterRCNNExport(model, image_size, nms).eval()


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
