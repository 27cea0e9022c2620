"""``detkit export``: a checkpoint to ``model.onnx`` + ``model.json`` in the run directory.

The engine rebuilds the detector from its checkpoint; :mod:`detkit.export` (a layer below)
wraps and exports the model it is given."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from detkit.engine.checkpoint import load_detector
from detkit.engine.options import switch
from detkit.errors import UserError
from detkit.export.onnx import ExportResult, check_opset, export_onnx

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
    nms = _flag("nms", nms)
    dynamic_batch = _flag("dynamic_batch", dynamic_batch)
    verify = _flag("verify", verify)
    check_opset(opset)
    tolerance = _tolerance(tolerance)
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


def _flag(name: str, value) -> bool:
    """A true/false argument, parsed as eval and predict parse theirs (``nms=no`` is refused
    rather than read as true)."""
    return switch({name: value}, name, False)


def _tolerance(value) -> float:
    """``tolerance`` as a number >= 0 (a word would otherwise fail in ``float()`` unnamed)."""
    try:
        tolerance = float(value)
    except (TypeError, ValueError):
        tolerance = -1.0
    if isinstance(value, bool) or not tolerance >= 0:
        raise UserError(f"tolerance must be a number >= 0, got {value!r}")
    return tolerance
