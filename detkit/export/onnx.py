"""Export a detector to ONNX (``model.onnx`` + ``model.json`` sidecar), then check the graph in
ONNX Runtime against PyTorch.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript, the default in
torch 2.9+) with :func:`detkit.ops._onnx.custom_translation_table` for detkit's custom ops
(NMS -> ``NonMaxSuppression``, RoI align/pool -> ``RoiAlign``/``MaxRoiPool``) and
``dynamic_shapes`` for the batch axis. The TorchScript exporter cannot translate detkit's
``torch.library`` ops, so it is not used. The graph has a fixed image size (priors and
anchors are constants) and a dynamic batch.

Input convention: ``images`` float32 ``[B, 3, H, W]``, RGB in ``[0, 1]``; the graph normalises
(mean/std) itself, like the PyTorch detectors, and the sidecar records the statistics.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from detkit.errors import UserError
from detkit.eval.compare import Comparison, compare_detections
from detkit.export.verify import ExportCheckError, sample_images
from detkit.export.wrappers import ExportWrapper, export_wrapper
from detkit.files import atomic_path, file_sha256, write_json
from detkit.structures import unpad_detections

log = logging.getLogger("detkit")

MIN_OPSET = 18  # detkit's translations use opset-18 onnxscript ops
SIDECAR_FORMAT = "detkit-onnx/1"
MAX_DYNAMIC_BATCH = 1024
# Where an export waits for its check; a rejected one stays there, named as such.
UNVERIFIED_NAME = "model.unverified.onnx"


@dataclass
class ExportResult:
    """Where the export went and how ONNX Runtime compared with PyTorch."""

    onnx_path: Path
    sidecar_path: Path
    comparison: Comparison | None


def export_onnx(
    model: nn.Module,
    output_dir: str | Path,
    *,
    image_size: int | Sequence[int] | None = None,
    nms: bool = True,
    dynamic_batch: bool = True,
    opset: int | None = None,
    class_names: Sequence[str] | None = None,
    transforms: dict | None = None,
    data: dict | None = None,
    verify: bool = True,
    tolerance: float = 1e-3,
    optimize: bool = True,
) -> ExportResult:
    """Write ``output_dir/model.onnx`` and ``output_dir/model.json``; check in ONNX Runtime.

    Both files are put in place only after the check passes; a rejected export is left as
    ``model.unverified.onnx`` / ``.json`` and earlier ``model.onnx`` / ``model.json`` stay.

    Args:
        model: a detkit ``SSD``, ``YOLO`` or ``FasterRCNN`` (put in eval mode).
        image_size: ``(h, w)`` or one int for a square graph input; default the model's
            ``image_size``.
        nms: end in ``multiclass_nms``'s padded outputs, else in decoded boxes and scores.
        dynamic_batch: a dynamic batch axis (else the batch is fixed at 1).
        opset: ONNX opset (from 18 to :func:`max_opset`), default the exporter's.
        class_names: written to the sidecar (default ``"0".."C-1"``).
        transforms: the eval transform config (``_target_`` dict) for ``detkit predict``.
        data: the training run's resolved ``data`` config node, so that ``detkit eval
            ckpt=model.onnx`` evaluates on the model's own dataset without ``data=``.
        verify: run ONNX Runtime and PyTorch on sample images and compare.
        tolerance: largest allowed box (pixels) and score difference.
        optimize: run the exporter's ONNX graph optimiser (constant folding, dead code).

    Raises:
        ExportCheckError: ONNX Runtime and PyTorch disagree beyond ``tolerance``.
        UserError: a bad argument (opset, image size, class names), named in the message.
    """
    size = resolve_image_size(image_size, model)
    check_opset(opset)
    names = list(class_names) if class_names else [str(i) for i in range(model.num_classes)]
    if len(names) != model.num_classes:
        raise UserError(f"{len(names)} class names for a model of {model.num_classes} classes")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wrapper = export_wrapper(model.eval(), size, nms)
    # Staged under other names and renamed into place only once checked, so that a failed
    # export never replaces a good model.onnx/model.json from an earlier run.
    staged = output_dir / UNVERIFIED_NAME
    try:
        proto_opset = write_onnx(wrapper, staged, dynamic_batch, opset, optimize)
        sidecar = describe(wrapper, names, dynamic_batch, proto_opset, transforms, data)
        # The pair is renamed into place one file at a time: the sidecar names its graph, so
        # a crash between the renames (or a graph copied over) is caught when they are read.
        sidecar["graph_sha256"] = file_sha256(staged)
        write_json(staged.with_suffix(".json"), sidecar, indent=2)
        comparison = None
        if verify:
            comparison = check_against_pytorch(wrapper, staged, dynamic_batch, tolerance)
    except ExportCheckError as err:
        # Kept for inspection (the point of a strict tolerance is often to look at the graph).
        raise ExportCheckError(
            f"{err}; the rejected export is kept as {staged.name} and "
            f"{staged.with_suffix('.json').name}, model.onnx and model.json were left unchanged"
        ) from err
    except BaseException:
        _remove_pair(staged)  # half-written or unchecked: of no use to anyone
        raise
    onnx_path = output_dir / "model.onnx"
    sidecar_path = onnx_path.with_suffix(".json")
    _rename(staged.with_suffix(".json"), sidecar_path)
    _rename(staged, onnx_path)
    log.info("wrote %s and %s", onnx_path, sidecar_path)
    return ExportResult(onnx_path, sidecar_path, comparison)


def max_opset() -> int:
    """The newest opset the installed torch exporter targets; above it the exporter's version
    converter fails and silently keeps its own opset."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET  # private: torch may move it
    except ImportError:
        import onnx

        return onnx.defs.onnx_opset_version()
    return ONNX_MAX_OPSET


def check_opset(opset: int | None) -> None:
    """Refuse an opset detkit's graphs or the installed exporter cannot produce."""
    if opset is None:
        return
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise UserError(f"opset must be an integer from {MIN_OPSET} to {top}, got {opset!r}")
    if opset < MIN_OPSET:
        raise UserError(f"opset={opset} is too old: detkit's ONNX graphs need opset >= {MIN_OPSET}")
    if opset > top:
        raise UserError(
            f"opset={opset} is newer than the installed torch exporter supports "
            f"(opset {MIN_OPSET} to {top})"
        )


def _rename(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)  # atomic: target is the old file or the new one
    except OSError as err:
        raise UserError(f"cannot write {target}: {err.strerror or err}") from err


def _remove_pair(onnx_path: Path) -> None:
    for path in (onnx_path, onnx_path.with_suffix(".json")):
        path.unlink(missing_ok=True)


def resolve_image_size(image_size, model: nn.Module) -> tuple[int, int]:
    """``(h, w)`` from an int, a pair, or the model's ``image_size``."""
    size = image_size if image_size is not None else getattr(model, "image_size", None)
    if size is None:
        raise UserError("image_size is not set and the model has no image_size: pass image_size=")
    if isinstance(size, int):
        size = (size, size)
    try:
        hw = tuple(int(v) for v in size)
    except (TypeError, ValueError) as err:
        raise UserError(f"image_size must be an int or [h, w], got {size!r}") from err
    if len(hw) != 2 or min(hw) < 1:
        raise UserError(f"image_size must be an int or [h, w] of positive ints, got {size!r}")
    return hw  # type: ignore[return-value]


def write_onnx(
    wrapper: ExportWrapper,
    path: Path,
    dynamic_batch: bool,
    opset: int | None,
    optimize: bool = True,
) -> int:
    """Export with the dynamo exporter, save, run ``onnx.checker``; returns the opset."""
    import onnx

    from detkit.ops._onnx import custom_translation_table

    # Two different images: a batch of 1 would make torch.export specialise the batch to 1.
    batch = 2 if dynamic_batch else 1
    example = sample_images(batch, wrapper.image_size, seed=1).to(_device(wrapper))
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            custom_translation_table=custom_translation_table(),
            dynamic_shapes=dynamic_shapes,
            input_names=["images"],
            output_names=list(wrapper.output_names),
            opset_version=opset,
            external_data=False,
            optimize=optimize,
            verbose=False,
        )
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    got = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and got != opset:
        # The exporter falls back to its own opset when its version converter fails.
        raise UserError(f"opset={opset} could not be produced: the exporter wrote opset {got}")
    return got


def describe(
    wrapper: ExportWrapper,
    class_names: list[str],
    dynamic_batch: bool,
    opset: int,
    transforms: dict | None,
    data: dict | None = None,
) -> dict:
    """The sidecar: what the graph expects and returns, for users, ``detkit predict`` and
    ``detkit eval`` (which also read the eval ``transforms`` and the training ``data``)."""
    model = wrapper.model
    h, w = wrapper.image_size
    batch = "batch" if dynamic_batch else 1
    return {
        "format": SIDECAR_FORMAT,
        "family": wrapper.family,
        "class_names": class_names,
        "num_classes": len(class_names),
        "opset": opset,
        "nms": wrapper.nms,
        "dynamic_batch": dynamic_batch,
        "input": {
            "name": "images",
            "shape": [batch, 3, h, w],
            "dtype": "float32",
            "layout": "NCHW, RGB, values in [0, 1]",
            "image_size": [h, w],
            "normalization": {
                "inside_graph": True,
                "mean": model.normalize.mean.flatten().tolist(),
                "std": model.normalize.std.flatten().tolist(),
            },
        },
        "outputs": output_layout(wrapper, batch),
        "postprocess": wrapper.nms_settings(),
        "transforms": transforms,
        "data": data,
    }


def output_layout(wrapper: ExportWrapper, batch) -> list[dict]:
    """Names, shapes and meaning of the graph outputs."""
    settings = wrapper.nms_settings()
    if wrapper.nms:
        k = settings["max_detections"]
        return [
            {"name": "boxes", "shape": [batch, k, 4], "dtype": "float32",
             "meaning": "xyxy in input-image pixels; rows past num_detections are zeros"},
            {"name": "scores", "shape": [batch, k], "dtype": "float32",
             "meaning": "detection scores, descending"},
            {"name": "labels", "shape": [batch, k], "dtype": "int64",
             "meaning": "class index 0..C-1 into class_names"},
            {"name": "num_detections", "shape": [batch], "dtype": "int64",
             "meaning": "valid rows per image"},
        ]  # fmt: skip
    per_class = wrapper.family == "faster_rcnn"
    box_shape = [batch, "N", "C", 4] if per_class else [batch, "N", 4]
    return [
        {"name": "boxes", "shape": box_shape, "dtype": "float32",
         "meaning": "decoded, clipped xyxy pixels" + (" per class" if per_class else "")},
        {"name": "scores", "shape": [batch, "N", "C"], "dtype": "float32",
         "meaning": "per-class scores (no background), before threshold and NMS"},
    ]  # fmt: skip


def check_against_pytorch(
    wrapper: ExportWrapper, onnx_path: Path, dynamic_batch: bool, tolerance: float
) -> Comparison:
    """Run the graph in ONNX Runtime and the detector in PyTorch on sample images (batches
    of 1 and 3 when the batch is dynamic); raise :class:`ExportCheckError` on disagreement."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    sizes = (1, 3) if dynamic_batch else (1, 1)
    total = Comparison()
    for seed, batch in enumerate(sizes):
        images = sample_images(batch, wrapper.image_size, seed=100 + seed)
        got = session.run(None, {"images": images.numpy()})
        total = total.merge(compare_outputs(wrapper, images, got, tolerance))
    # Logged, not also printed: the commands' logging prints INFO on the console already.
    log.info("onnxruntime vs PyTorch: %s", total.summary())
    if not total.ok(tolerance):
        raise ExportCheckError(
            f"{onnx_path}: ONNX Runtime disagrees with PyTorch beyond tolerance {tolerance}: "
            f"{total.summary()}"
        )
    return total


def compare_outputs(wrapper: ExportWrapper, images, got: list, tolerance: float) -> Comparison:
    """With NMS: ONNX detections vs the detector's own eager ``forward`` (which also checks
    the wrapper); without: raw outputs vs the wrapper run eagerly, element by element."""
    device = _device(wrapper)
    with torch.no_grad():
        if not wrapper.nms:
            want = wrapper(images.to(device))
            box_diff = float((torch.from_numpy(got[0]) - want[0].cpu()).abs().max())
            score_diff = float((torch.from_numpy(got[1]) - want[1].cpu()).abs().max())
            return Comparison(box_diff, score_diff, images=len(images), raw=True)
        expected = wrapper.model(images.to(device)).detections
    settings = wrapper.nms_settings()
    return compare_detections(
        expected,
        unpad_detections(*(torch.from_numpy(g) for g in got)),
        score_tolerance=tolerance,
        score_threshold=settings["score_threshold"],
        max_detections=settings["max_detections"],
    )


def _device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")
