import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from detkit.matching import (
    AnchorPointGrid,
    AnchorPoints,
    DeltaXYWHCoder,
    DistanceCoder,
    YOLOGrid,
    YOLOv1Cells,
    YOLOv1Coder,
    YOLOv3Coder,
)


def _random_boxes(n, scale=100.0):
    xy = torch.rand(n, 2) * scale
    return torch.cat((xy, xy + 10 + torch.rand(n, 2) * scale), dim=1)  # sizes within e^4


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2, 3, 4, 5)])
def test_delta_coder_equals_torchvision(weights):
    boxes, priors = _random_boxes(500), _random_boxes(500)
    ours, ref = DeltaXYWHCoder(weights), BoxCoder(weights)
    torch.testing.assert_close(
        ours.encode(priors, boxes), ref.encode_single(boxes, priors), rtol=0, atol=1e-6
    )
    deltas = torch.randn(500, 4) * 2
    torch.testing.assert_close(
        ours.decode(priors, deltas), ref.decode_single(deltas, priors), rtol=1e-6, atol=1e-4
    )


def test_delta_decode_clamps_exponent_like_torchvision():
    priors = _random_boxes(8)
    deltas = torch.tensor([[0.0, 0.0, 50.0, -3.0]]).repeat(8, 1)
    clip = math.log(1000.0 / 16)
    got = DeltaXYWHCoder(bbox_xform_clip=clip).decode(priors, deltas)
    expected = BoxCoder((1.0, 1.0, 1.0, 1.0), clip).decode_single(deltas, priors)
    torch.testing.assert_close(got, expected)
    widths = got[:, 2] - got[:, 0]
    torch.testing.assert_close(widths, (priors[:, 2] - priors[:, 0]) * 1000 / 16)


def test_delta_coder_round_trip_broadcasts_over_batch():
    coder = DeltaXYWHCoder((10.0, 10.0, 5.0, 5.0))
    priors = _random_boxes(30)
    boxes = torch.stack([_random_boxes(30) for _ in range(3)])  # [3, 30, 4]
    deltas = coder.encode(priors, boxes)
    assert deltas.shape == (3, 30, 4)
    torch.testing.assert_close(coder.decode(priors, deltas), boxes, rtol=1e-5, atol=1e-3)


def test_delta_coder_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weights"):
        DeltaXYWHCoder((1.0, 1.0))
    with pytest.raises(ValueError, match="boxes"):
        DeltaXYWHCoder().encode(torch.zeros(3, 4), torch.zeros(3, 5))


def test_yolov3_coder_hand_values_and_round_trip():
    coder = YOLOv3Coder()
    # box centred at (52, 20) with size 40x10; stride 16 -> cell (3, 1), offsets (0.25, 0.25)
    box = torch.tensor([[32.0, 15.0, 72.0, 25.0]])
    grid = YOLOGrid(
        torch.tensor([[3.0, 1.0]]), torch.tensor([[20.0, 20.0]]), torch.tensor([16.0]),
        torch.tensor([0]), torch.tensor([0]),
    )  # fmt: skip
    code = coder.encode(grid, box)
    torch.testing.assert_close(code, torch.tensor([[0.25, 0.25, math.log(2.0), math.log(0.5)]]))
    raw = torch.cat((torch.logit(code[:, :2]), code[:, 2:]), dim=1)
    torch.testing.assert_close(coder.decode(grid, raw), box)


def test_yolov1_coder_hand_values_and_round_trip():
    coder = YOLOv1Coder()
    box = torch.tensor([[100.0, 50.0, 200.0, 250.0]])  # centre (150, 150) in a 448 x 448 image
    cell = YOLOv1Cells(torch.tensor([[2.0, 2.0]]), 7, (448, 448))  # 150 * 7 / 448 = 2.34375
    code = coder.encode(cell, box)
    expected = torch.tensor([[0.34375, 0.34375, math.sqrt(100 / 448), math.sqrt(200 / 448)]])
    torch.testing.assert_close(code, expected)
    torch.testing.assert_close(coder.decode(cell, code), box)


def test_anchor_points_are_cell_centres_level_by_level():
    grid = AnchorPoints((8, 16))((24, 40))  # maps 3x5 and 2x3 (ceil)
    assert grid.points.shape == (15 + 6, 2) and grid.image_size == (24, 40)
    assert grid.points[:6].tolist() == [[4, 4], [12, 4], [20, 4], [28, 4], [36, 4], [4, 12]]
    assert grid.points[15:17].tolist() == [[8, 8], [24, 8]]
    assert grid.stride.tolist() == [8.0] * 15 + [16.0] * 6
    with pytest.raises(ValueError, match="do not match"):
        AnchorPoints((8, 16))((24, 40), [(3, 5), (1, 3)])


def test_distance_coder_hand_values_and_expectation_decoding():
    coder = DistanceCoder(reg_max=4)
    grid = AnchorPointGrid(torch.tensor([[20.0, 12.0]]), torch.tensor([8.0]), (32, 48))
    box = torch.tensor([[10.0, 4.0, 36.0, 14.0]])
    distances = coder.encode(grid, box)  # (20 - 10, 12 - 4, 36 - 20, 14 - 12) / 8
    torch.testing.assert_close(distances, torch.tensor([[1.25, 1.0, 2.0, 0.25]]))
    # Distributions whose expectation is each distance: mass split between the two bins
    # around it (what distribution focal loss trains towards) decode back to the box.
    lower = distances.floor().long()
    probs = torch.zeros(1, 4, 4)
    probs.scatter_(-1, lower[..., None], (1 - (distances - lower))[..., None])
    probs.scatter_add_(-1, (lower + 1)[..., None], (distances - lower)[..., None])
    torch.testing.assert_close(coder.decode(grid, probs.log()), box)
    # broadcasting over a batch of predictions against [P] points
    uniform = torch.zeros(3, 1, 4, 4)  # expectation 1.5 bins on each side
    torch.testing.assert_close(
        coder.decode(grid, uniform), torch.tensor([[[8.0, 0.0, 32.0, 24.0]]]).expand(3, 1, 4)
    )
    with pytest.raises(ValueError, match=r"\[\.\.\., 4, 4\]"):
        coder.decode(grid, torch.zeros(1, 4, 16))
    with pytest.raises(ValueError, match="reg_max"):
        DistanceCoder(reg_max=1)
