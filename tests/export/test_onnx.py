"""Each detector family exported once (dynamic batch, NMS in the graph) and run in
onnxruntime at batch 1 and 3 on different images, including an image without detections and
images with fewer candidates than every top-k, against the detector's own eager forward."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch

from detkit.eval.compare import compare_detections
from detkit.export import export_onnx
from detkit.structures import unpad_detections

FAMILIES = ["ssd_digits", "yolo_digits", "yolov8_digits", "faster_rcnn_digits"]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, helpers, tmp_path_factory):
    model, _ = helpers.build_model(request.param)
    helpers.calibrate(model)
    batches = helpers.make_batches(model)
    out = tmp_path_factory.mktemp(request.param)
    # optimize=False: the exporter's graph optimiser only folds/cleans (the CLI test runs it)
    # and halves the export time here.
    result = export_onnx(model, out, class_names=[f"c{i}" for i in range(10)], optimize=False)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    return request.param, model, batches, result, session


def run_both(model, session, images):
    got = unpad_detections(
        *(torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()}))
    )
    with torch.no_grad():
        want = model(images).detections
    return want, got


def test_graph_passes_checker_and_has_nms_and_dynamic_batch(exported):
    name, _, _, result, session = exported
    proto = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    assert "NonMaxSuppression" in ops
    if name.startswith("faster_rcnn"):
        assert "RoiAlign" in ops  # RPN, proposal NMS and RoI pooling all in the graph
    [images] = session.get_inputs()
    assert images.name == "images" and images.shape[1:] == [3, 256, 256]
    assert isinstance(images.shape[0], str)  # symbolic batch
    assert [o.name for o in session.get_outputs()] == [
        "boxes", "scores", "labels", "num_detections",
    ]  # fmt: skip
    assert result.comparison is not None and result.comparison.unmatched == 0


@pytest.mark.parametrize("batch", ["single", "mixed", "empty"])
def test_onnxruntime_equals_eager(exported, batch):
    _, model, batches, _, session = exported
    images = batches[batch]
    outputs = session.run(None, {"images": images.numpy()})
    k = model.nms_settings()["max_detections"]
    assert outputs[0].shape == (len(images), k, 4) and outputs[3].shape == (len(images),)
    want, got = run_both(model, session, images)
    counts = [len(d["boxes"]) for d in want]
    assert [len(d["boxes"]) for d in got] == counts
    if batch == "empty":
        assert counts == [0]
        assert not outputs[0].any() and not outputs[1].any()  # padding is zeros
    elif batch == "mixed":
        # zero detections next to images with fewer candidates than the top-k sizes
        assert counts[0] == 0 and min(counts[1:]) > 0 and min(counts[1:]) < k
    else:
        assert counts[0] > 0
    comparison = compare_detections(want, got, score_tolerance=1e-6)
    assert comparison.unmatched == 0 and comparison.borderline == 0
    assert comparison.matched == sum(counts)  # matching requires equal labels
    assert comparison.max_box_diff < 1e-3 and comparison.max_score_diff < 1e-5


def test_sidecar_describes_the_graph(exported):
    name, model, _, result, _ = exported
    info = json.loads(result.sidecar_path.read_text())
    assert info["class_names"] == [f"c{i}" for i in range(10)]
    assert info["input"]["shape"] == ["batch", 3, 256, 256]
    norm = info["input"]["normalization"]
    assert norm["inside_graph"] is True
    assert norm["mean"] == pytest.approx(model.normalize.mean.flatten().tolist())
    assert [o["name"] for o in info["outputs"]] == ["boxes", "scores", "labels", "num_detections"]
    assert info["family"] == model.family and name.startswith(model.family)
    assert info["opset"] >= 18 and info["nms"] is True
