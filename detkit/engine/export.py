"""``detkit export``: a checkpoint to ``model.onnx`` + ``model.json`` in the run directory.

The engine rebuilds the detector from its checkpoint; :mod:`detkit.export` (a layer below)
wraps and exports the model it is given."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from detkit.engine.checkpoint import load_detector
from detkit.errors import UserError
from detkit.export.onnx import ExportResult, check_opset, export_onnx
from detkit.options import number, switch

FORMATS = ("onnx",)


def export_checkpoint(
    ckpt: str | Path,
    output_dir: str | Path,
    format: str = "onnx",  # noqa: A002 - the CLI's word
    nms: bool = True,
    dynamic_batch: bool = True,
    image_size=None,
    opset: int | None = None,
    verify: bool = True,
    tolerance: float = 1e-3,
) -> ExportResult:
    """Rebuild the detector from ``ckpt`` and export it (see :func:`export_onnx`).

    Class names, the eval transforms and the dataset (the resolved ``data`` node) come from
    the checkpoint's config, so the exported model can be used by ``detkit predict`` and
    ``detkit eval`` without the PyTorch model code.
    """
    if str(format).lower() not in FORMATS:
        raise UserError(f"format={format!r} is not supported; choose one of {list(FORMATS)}")
    if ckpt is None:
        raise UserError("export needs ckpt=<checkpoint>")
    if str(ckpt).endswith(".onnx"):
        raise UserError(f"ckpt={ckpt} is already an ONNX model; export needs a checkpoint")
    # Every argument is checked before the (slow) checkpoint load.
    nms = switch(nms, "nms")
    dynamic_batch = switch(dynamic_batch, "dynamic_batch")
    verify = switch(verify, "verify")
    check_opset(opset)
    tolerance = number(tolerance, "tolerance", 0)
    model, config = load_detector(ckpt)
    if image_size is not None and not isinstance(image_size, int):
        image_size = list(
            OmegaConf.to_container(image_size) if OmegaConf.is_config(image_size) else image_size
        )
    data = config.get("data") or {}
    names = data.get("class_names")
    transforms = config.get("transforms")
    return export_onnx(
        model,
        output_dir,
        image_size=image_size,
        nms=nms,
        dynamic_batch=dynamic_batch,
        opset=opset,
        class_names=list(names) if names else None,
        transforms=(
            OmegaConf.to_container(transforms.eval, resolve=True)
            if transforms is not None and transforms.get("eval") is not None
            else None
        ),
        data=OmegaConf.to_container(config.data, resolve=True) if config.get("data") else None,
        verify=verify,
        tolerance=tolerance,
    )
