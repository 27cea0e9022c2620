"""The box/NMS custom ops trace through torch.compile(fullgraph=True) and torch.export."""

import torch

from detkit import ops


def postprocess(boxes, scores, all_boxes, all_scores):
    iou = ops.box_iou(boxes, boxes)
    keep = ops.nms(boxes, scores, 0.5)
    kept = boxes[keep] * 2
    return iou.sum(), kept, ops.multiclass_nms(all_boxes, all_scores, 0.1, 0.5, 10, 50)


def inputs():
    xy = torch.rand(2, 40, 2) * 50
    all_boxes = torch.cat([xy, xy + torch.rand(2, 40, 2) * 20 + 1], dim=-1)
    return all_boxes[0], torch.rand(40), all_boxes, torch.rand(2, 40, 3)


def test_compile_fullgraph_matches_eager():
    compiled = torch.compile(postprocess, fullgraph=True, backend="aot_eager")
    args = inputs()
    eager, traced = postprocess(*args), compiled(*args)
    torch.testing.assert_close(traced[0], eager[0])
    assert torch.equal(traced[1], eager[1])
    for got, want in zip(traced[2], eager[2], strict=True):
        assert torch.equal(got, want)


def test_export_keeps_custom_ops():
    class Post(torch.nn.Module):
        def forward(self, boxes, scores, all_boxes, all_scores):
            return postprocess(boxes, scores, all_boxes, all_scores)

    args = inputs()
    program = torch.export.export(Post(), args)
    targets = {str(node.target) for node in program.graph.nodes}
    assert {"detkit.nms.default", "detkit.multiclass_nms.default"} <= targets
    out = program.module()(*args)
    assert torch.equal(out[1], postprocess(*args)[1])
