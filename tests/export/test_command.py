"""``detkit export`` end to end on a tiny checkpoint, ``detkit predict`` with the exported
``model.onnx`` (no model code) against the checkpoint, and the failure paths."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from detkit import cli
from detkit.engine.checkpoint import load_detector
from detkit.eval.compare import compare_detections
from detkit.export.onnx import check_against_pytorch
from detkit.export.verify import ExportCheckError
from detkit.export.wrappers import export_wrapper
from detkit.testing import detections_from_json


@pytest.fixture(scope="module")
def exported(helpers, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = helpers.tiny_checkpoint(root / "tiny.ckpt", "ssd_digits")
    out = root / "export"
    code = cli.main(["export", f"ckpt={ckpt}", "nms=false", f"hydra.run.dir={out}"])
    return code, ckpt, out


def test_export_writes_a_checked_graph_and_sidecar(exported, capfd):
    code, _, out = exported
    assert code == 0
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    info = json.loads((out / "model.json").read_text())
    assert info["nms"] is False and info["family"] == "ssd"
    assert [o["name"] for o in info["outputs"]] == ["boxes", "scores"]
    assert info["outputs"][1]["shape"] == ["batch", "N", "C"]
    assert info["input"]["image_size"] == [256, 256]
    assert info["postprocess"]["per_class_top_k"] == 200
    assert info["transforms"]["_target_"].endswith("ssd_eval")


def test_predict_with_onnx_equals_predict_with_checkpoint(exported, tmp_path):
    _, ckpt, out = exported
    images = tmp_path / "images"
    images.mkdir()
    gen = np.random.default_rng(0)
    for i, (h, w) in enumerate([(200, 300), (256, 256), (120, 90)]):
        pixels = (gen.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"im{i}.png")
    runs = {}
    for name, model in (("onnx", out / "model.onnx"), ("ckpt", ckpt)):
        run_dir = tmp_path / name
        args = [f"ckpt={model}", f"source={images}", "score_threshold=0.05"]
        assert cli.main(["predict", *args, f"hydra.run.dir={run_dir}"]) == 0
        runs[name] = json.loads((run_dir / "detections.json").read_text())
    for from_onnx, from_ckpt in zip(runs["onnx"], runs["ckpt"], strict=True):
        dets = [detections_from_json(r["detections"]) for r in (from_ckpt, from_onnx)]
        assert len(dets[0]["boxes"]) > 0
        result = compare_detections([dets[0]], [dets[1]], score_tolerance=1e-5)
        assert result.unmatched == 0 and result.borderline == 0
        assert result.max_box_diff < 1e-3 and result.max_score_diff < 1e-5


def test_the_check_is_logged_once_and_not_printed(exported, capsys, caplog):
    """The commands' logging prints INFO on the console: a print as well showed it twice."""
    _, ckpt, out = exported
    model, _ = load_detector(ckpt)
    wrapper = export_wrapper(model, (256, 256), nms=False)
    with caplog.at_level("INFO", logger="detkit"):
        check_against_pytorch(wrapper, out / "model.onnx", True, 1e-3)
    assert "onnxruntime vs PyTorch" not in capsys.readouterr().out
    assert [r.getMessage().startswith("onnxruntime vs PyTorch") for r in caplog.records] == [True]


def test_disagreeing_graph_fails_the_check(exported):
    _, ckpt, out = exported
    model, _ = load_detector(ckpt)
    with torch.no_grad():
        model.head.predictors[0].bias.add_(0.5)  # PyTorch side no longer what was exported
    wrapper = export_wrapper(model, (256, 256), nms=False)
    with pytest.raises(ExportCheckError, match="disagrees with PyTorch"):
        check_against_pytorch(wrapper, out / "model.onnx", True, 1e-3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("format=tensorrt", "format='tensorrt'"),
        ("opset=11", "opset=11"),
        ("image_size=[0,5]", "image_size"),
    ],
)
def test_bad_arguments_are_named(exported, tmp_path, capsys, override, message):
    _, ckpt, _ = exported
    code = cli.main(["export", f"ckpt={ckpt}", override, f"hydra.run.dir={tmp_path}"])
    assert code == 1
    assert message in capsys.readouterr().err


def test_missing_checkpoint_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.ckpt"
    assert cli.main(["export", f"ckpt={missing}", f"hydra.run.dir={tmp_path}"]) == 1
    assert str(missing) in capsys.readouterr().err


def test_rejected_export_leaves_the_previous_one_unchanged(exported, tmp_path, capsys):
    _, ckpt, out = exported
    good = {name: (out / name).read_bytes() for name in ("model.onnx", "model.json")}
    for name, data in good.items():
        (tmp_path / name).write_bytes(data)
    # tolerance=0: the float rounding between ONNX Runtime and PyTorch is enough to fail
    code = cli.main(["export", f"ckpt={ckpt}", "nms=false", "tolerance=0",
                     f"hydra.run.dir={tmp_path}"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "disagrees with PyTorch" in err and "model.onnx and model.json were left unchanged" in err
    )
    assert all((tmp_path / name).read_bytes() == data for name, data in good.items())
    assert (tmp_path / "model.unverified.onnx").exists()  # kept for inspection, as said
    assert (tmp_path / "model.unverified.json").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("opset=99", "opset=99 is newer than the installed torch exporter supports (opset 18 to"),
        ("opset=abc", "opset must be an integer from 18 to"),
        ("nms=no", "nms must be true or false, got 'no'"),
        ("dynamic_batch=1", "dynamic_batch must be true or false, got 1"),
        ("verify=yes", "verify must be true or false, got 'yes'"),
        ("tolerance=abc", "tolerance must be a number >= 0, got 'abc'"),
        ("tolerance=-1", "tolerance must be a number >= 0, got -1"),
    ],
)
def test_bad_switches_opsets_and_tolerances_are_one_named_line(
    exported, tmp_path, capsys, override, message
):
    _, ckpt, _ = exported
    code = cli.main(["export", f"ckpt={ckpt}", override, f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "model.onnx").exists()
