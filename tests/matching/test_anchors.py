import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TVDefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from detkit.matching import AnchorGenerator, DefaultBoxGenerator


def _torchvision_priors(generator, image_size, feature_map_sizes):
    images = ImageList(torch.zeros(1, 3, *image_size), [tuple(image_size)])
    feats = [torch.zeros(1, 8, h, w) for h, w in feature_map_sizes]
    return generator(images, feats)[0]


@pytest.mark.parametrize(
    ("sizes", "ratios", "image_size", "fm_sizes"),
    [
        (((128, 256, 512),), ((0.5, 1.0, 2.0),), (600, 800), [(38, 50)]),
        (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5, (320, 480),
         [(80, 120), (40, 60), (20, 30), (10, 15), (5, 8)]),
        (((16, 24),), ((0.25, 1.0, 3.0),), (97, 131), [(7, 9)]),
    ],
)  # fmt: skip
def test_anchor_generator_equals_torchvision(sizes, ratios, image_size, fm_sizes):
    ours = AnchorGenerator(sizes, ratios)
    ref = TVAnchorGenerator(sizes, ratios)
    expected = _torchvision_priors(ref, image_size, fm_sizes)
    got = ours(image_size, fm_sizes)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert ours.num_anchors_per_location() == ref.num_anchors_per_location()


def test_faster_rcnn_default_has_nine_anchors_per_location():
    gen = AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    assert gen.num_anchors_per_location() == [9]
    anchors = gen((64, 64), [(2, 2)])
    assert anchors.shape == (36, 4)
    # first cell, ratio 0.5 (h/w), size 128: w = 128 * sqrt 2, h = 128 / sqrt 2, rounded halves
    assert anchors[0].tolist() == [-91.0, -45.0, 91.0, 45.0]


def test_cross_boundary_mask():
    gen = AnchorGenerator(((32,),), ((1.0,),))
    anchors = gen((64, 64), [(4, 4)])  # stride 16, 32x32 anchors centred on 0, 16, 32, 48
    keep = gen.inside_image(anchors, (64, 64))
    expected = (anchors[:, :2] >= 0).all(1) & (anchors[:, 2:] <= 64).all(1)
    assert torch.equal(keep, expected)
    assert keep.sum() == 9  # torchvision centres sit at 0, 16, 32, 48: the last three fit


def test_anchor_generator_rejects_bad_input():
    with pytest.raises(ValueError, match="levels"):
        AnchorGenerator(((32,), (64,)), ((1.0,),) * 3)
    gen = AnchorGenerator()
    with pytest.raises(ValueError, match="feature maps"):
        gen((64, 64), [(4, 4), (2, 2)])


SSD300 = dict(
    aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
    steps=[8, 16, 32, 64, 100, 300],
)
SSD300_FMS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def test_ssd300_default_boxes_equal_torchvision():
    ours = DefaultBoxGenerator(**SSD300)
    boxes = ours((300, 300), SSD300_FMS)
    expected = _torchvision_priors(TVDefaultBoxGenerator(**SSD300), (300, 300), SSD300_FMS)
    assert boxes.shape == (8732, 4)
    assert torch.equal(boxes, expected)
    assert ours.num_anchors_per_location() == [4, 6, 6, 6, 4, 4]


@pytest.mark.parametrize("clip", [True, False])
def test_default_scales_and_no_steps_equal_torchvision(clip):
    ratios = [[2, 3], [2], [2, 3]]
    fms = [(8, 10), (4, 5), (2, 3)]
    ours = DefaultBoxGenerator(ratios, min_ratio=0.2, max_ratio=0.95, clip=clip)
    ref = TVDefaultBoxGenerator(ratios, min_ratio=0.2, max_ratio=0.95, clip=clip)
    assert ours.scales == pytest.approx(ref.scales)
    assert torch.equal(ours((128, 160), fms), _torchvision_priors(ref, (128, 160), fms))


def test_default_boxes_cxcywh_follow_the_paper():
    gen = DefaultBoxGenerator([[2]], min_ratio=0.2, max_ratio=0.9)  # one level: scales [.2, .9]
    boxes = gen.cxcywh((100, 100), [(2, 2)])
    assert boxes.shape == (2 * 2 * 4, 4)
    s, s_prime, r = 0.2, (0.2 * 0.9) ** 0.5, 2**0.5
    first_cell = torch.tensor(
        [[0.25, 0.25, s, s], [0.25, 0.25, s_prime, s_prime],
         [0.25, 0.25, s * r, s / r], [0.25, 0.25, s / r, s * r]]
    )  # fmt: skip
    torch.testing.assert_close(boxes[:4], first_cell)
    assert boxes[4:8, :2].tolist() == [[0.75, 0.25]] * 4  # next column
