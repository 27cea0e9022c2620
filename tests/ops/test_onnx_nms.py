"""A tiny module calling nms/batched_nms/box_iou/multiclass_nms exports (dynamo exporter) and
runs in onnxruntime with the eager results."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from detkit import ops
from detkit.ops._onnx import custom_translation_table


class Postprocess(torch.nn.Module):
    def forward(self, boxes, scores, batch_boxes, batch_scores):
        keep = ops.nms(boxes, scores, 0.5)
        labels = (scores * 3).long()
        per_class = ops.batched_nms(boxes, scores, labels, 0.5)
        iou = ops.box_iou(boxes, boxes)
        dets = ops.multiclass_nms(batch_boxes, batch_scores, 0.05, 0.5, 30, 200, per_class_top_k=40)
        return (keep, per_class, iou, *dets)


def make_inputs(seed: int, score_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(2, 100, 2, generator=gen) * 50
    batch_boxes = torch.cat([xy, xy + torch.rand(2, 100, 2, generator=gen) * 25 + 1], dim=-1)
    batch_scores = torch.rand(2, 100, 5, generator=gen) * score_scale
    return batch_boxes[0], batch_scores[0, :, 0], batch_boxes, batch_scores


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "postprocess.onnx"
    program = torch.onnx.export(
        Postprocess(),
        make_inputs(0),
        dynamo=True,
        custom_translation_table=custom_translation_table(),
    )
    program.save(str(path))
    types = {node.op_type for node in program.model_proto.graph.node}
    assert "NonMaxSuppression" in types and "TopK" in types
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# scale 0.052: ~19 candidates per image, fewer than the 30 outputs (TopK k must shrink)
@pytest.mark.parametrize(("seed", "scale"), [(1, 1.0), (2, 0.3), (3, 0.052)])
def test_onnxruntime_equals_eager(session, seed, scale):
    args = make_inputs(seed, scale)
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)}
    got = session.run(None, feed)
    want = Postprocess()(*args)
    if scale < 0.1:
        assert int(want[-1].max()) < 30
    for name, g, w in zip(
        ["keep", "batched", "iou", "boxes", "scores", "labels", "num"], got, want, strict=True
    ):
        assert g.shape == tuple(w.shape), name
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)
