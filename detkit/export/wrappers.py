"""The export wrapper: a detector's own fixed-shape inference as a traceable module.

Every detkit detector has one batched, fixed-shape inference method, ``predict_padded``
(:mod:`detkit.models.detectors.one_stage`); export traces that very method, so the graph and
eager mode cannot drift apart. The wrapper only fixes the image size the graph is built for
and picks the method:

- ``nms=True``: ``predict_padded`` -> ``boxes [B, K, 4]`` float32 xyxy input pixels,
  ``scores [B, K]``, ``labels [B, K]`` int64 in ``0..C-1`` and ``num_detections [B]`` int64;
  rows past ``num_detections`` are zeros (``K = detections_per_image``).
- ``nms=False``: ``predict_candidates`` -> ``boxes [B, N, 4]`` (Faster R-CNN: class-specific
  ``[B, N, C, 4]``) and ``scores [B, N, C]`` (no background column), before any threshold
  or NMS.
"""

from __future__ import annotations

from torch import Tensor, nn

NMS_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
RAW_OUTPUTS = ("boxes", "scores")


class ExportWrapper(nn.Module):
    """``images [B, 3, H, W] -> tensors`` for a detector, at a fixed ``(h, w)``."""

    def __init__(self, model: nn.Module, image_size: tuple[int, int], nms: bool = True) -> None:
        super().__init__()
        if not callable(getattr(model, "predict_padded", None)):
            raise ValueError(
                f"cannot export a {type(model).__name__}: a detector needs the detkit inference "
                "contract (predict_padded / predict_candidates)"
            )
        self.model = model.eval()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.nms = bool(nms)
        self.family = str(getattr(model, "family", type(model).__name__.lower()))

    @property
    def output_names(self) -> tuple[str, ...]:
        return NMS_OUTPUTS if self.nms else RAW_OUTPUTS

    def nms_settings(self) -> dict:
        """The selection's settings (recorded in the sidecar; applied by ONNX Runtime users of
        a ``nms=False`` graph)."""
        return self.model.nms_settings()

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if self.nms:
            return self.model.predict_padded(images)
        return self.model.predict_candidates(images)


def export_wrapper(
    model: nn.Module, image_size: tuple[int, int], nms: bool = True
) -> ExportWrapper:
    """The export wrapper of ``model``, in eval mode."""
    return ExportWrapper(model, image_size, nms).eval()
