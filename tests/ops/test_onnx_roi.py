"""A tiny module using roi_align and roi_pool exported with torch.onnx (dynamo exporter and
detkit's translations), run in onnxruntime and compared with eager PyTorch."""

import warnings

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from detkit.ops import roi_align, roi_pool  # noqa: E402
from detkit.ops.roi import ROI_ONNX_TRANSLATIONS  # noqa: E402


class Pooler(torch.nn.Module):
    """Every ONNX attribute combination the translations map: aligned (half_pixel vs
    output_half_pixel), adaptive vs fixed sampling, spatial scales, max pooling."""

    def forward(self, features, rois):
        return (
            roi_align(features, rois, (3, 2), 0.5, -1, aligned=False),
            roi_align(features, rois, 3, 0.5, 2, aligned=True),
            roi_align(features, rois, 2, 1.0, -1, aligned=True),
            roi_pool(features, rois, (2, 3), 0.5),
        )


def rois_for(num, seed):
    g = torch.Generator().manual_seed(seed)
    xy1 = torch.rand(num, 2, generator=g) * 30 - 4
    wh = torch.rand(num, 2, generator=g) * 14
    batch = torch.randint(0, 2, (num, 1), generator=g).float()
    edges = torch.tensor(
        [[0, 3.0, 3.0, 3.0, 3.0], [1, 9.0, 8.0, 2.0, 1.0], [0, 1.0, 1.0, 2.0, 2.0]]
    )
    return torch.cat([torch.cat([batch, xy1, xy1 + wh], dim=1), edges])


def test_roi_ops_export_to_onnx_and_run_in_onnxruntime(tmp_path):
    features = torch.randn(2, 3, 12, 14)
    rois = rois_for(7, seed=0)
    num_rois = torch.export.Dim("num_rois", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Pooler(),
            (features, rois),
            dynamo=True,
            custom_translation_table=ROI_ONNX_TRANSLATIONS,
            dynamic_shapes=({}, {0: num_rois}),
        )
    path = tmp_path / "pooler.onnx"
    program.save(str(path))
    node_types = [node.op_type for node in program.model_proto.graph.node]
    assert node_types.count("RoiAlign") == 3 and node_types.count("MaxRoiPool") == 1

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for rois_in in (rois, rois_for(12, seed=1)):  # a different box count: dynamic axis
        outputs = session.run(
            None, dict(zip(names, (features.numpy(), rois_in.numpy()), strict=True))
        )
        expected = Pooler()(features, rois_in)
        assert len(outputs) == len(expected)
        for got, want in zip(outputs, expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
