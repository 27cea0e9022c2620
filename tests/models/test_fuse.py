"""Folding BatchNorm into convolutions: the same function as the unfolded eval-mode model."""

import copy

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from detkit.config import compose_config, safe_instantiate
from detkit.models.fuse import fuse_conv_bn, fuse_for_inference
from detkit.testing import calibrate_random_weights, digits_batch


def _random_statistics(bn: nn.Module, gen: torch.Generator) -> nn.Module:
    for name in ("running_mean", "bias"):
        getattr(bn, name).copy_(torch.randn(bn.running_mean.shape, generator=gen) * 0.5)
    for name in ("running_var", "weight"):
        getattr(bn, name).copy_(torch.rand(bn.running_mean.shape, generator=gen) + 0.5)
    return bn


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, FrozenBatchNorm2d])
@pytest.mark.parametrize(
    "conv_args",
    [
        {"kernel_size": 3, "padding": 1, "bias": False},
        {"kernel_size": 1, "stride": 2, "bias": True},
        {"kernel_size": 3, "padding": 2, "dilation": 2, "groups": 8, "bias": False},
    ],
    ids=["3x3", "1x1-stride2-bias", "depthwise-dilated"],
)
@torch.no_grad()
def test_folded_block_equals_conv_then_eval_batchnorm(norm, conv_args):
    gen = torch.Generator().manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 8, **conv_args), norm(8), nn.ReLU()).eval()
    _random_statistics(block[1], gen)
    x = torch.randn(2, 8, 13, 11, generator=gen)
    expected, original = block(x), block[0]
    assert fuse_conv_bn(block) == 1
    assert isinstance(block[1], nn.Identity) and block[0].bias is not None
    geometry = ("stride", "padding", "dilation", "groups", "kernel_size")
    assert all(getattr(block[0], a) == getattr(original, a) for a in geometry)
    assert not block[0].weight.requires_grad
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_only_a_batchnorm_right_after_a_conv_with_running_statistics_is_folded():
    gen = torch.Generator().manual_seed(1)
    after_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    other_width = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model = nn.Sequential(after_relu, batch_stats, other_width).eval()
    _random_statistics(after_relu[2], gen)
    x = torch.randn(1, 3, 9, 9, generator=gen)
    expected = model[0](x)
    assert fuse_conv_bn(model) == 1  # only other_width's second conv + its BatchNorm
    assert isinstance(other_width[2], nn.Identity)
    assert isinstance(after_relu[2], nn.BatchNorm2d) and isinstance(batch_stats[1], nn.BatchNorm2d)
    torch.testing.assert_close(model[0](x), expected)


def test_folding_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))


@pytest.mark.parametrize("model", ["ssd_digits", "yolov8_digits", "faster_rcnn_digits"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_digits_detectors_detect_the_same(model, channels_last):
    cfg = compose_config("train", [f"model={model}", "data=digits"])
    torch.manual_seed(0)
    detector = safe_instantiate(cfg.model)
    images, _ = digits_batch(2, image_size=256)
    with torch.no_grad():
        calibrate_random_weights(detector, [images])
    folded = copy.deepcopy(detector)
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in detector.modules())
    # every BatchNorm of these follows a conv; the YOLO's two neck CSP blocks (no bottlenecks)
    # and two head levels merge their parallel convolutions
    merges = {"yolov8_digits": 4}.get(model, 0)
    assert fuse_for_inference(folded) == (batch_norms, merges) and batch_norms > 0
    layout = torch.channels_last if channels_last else torch.contiguous_format
    detector.to(memory_format=layout), folded.to(memory_format=layout)
    convs = [m.weight for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=layout) for w in convs)
    sizes = torch.tensor([[256, 256], [200, 240]])
    batch = images.contiguous(memory_format=layout)
    with torch.inference_mode():
        for mine, theirs in zip(_features(folded, batch), _features(detector, batch), strict=True):
            # float rounding of a dozen layers: relative to the map's own scale
            scale = float(theirs.abs().max())
            torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-4 * scale)
        boxes, scores, labels, _ = folded.predict_padded(batch, sizes)
        ref_boxes, ref_scores, ref_labels, ref_counts = detector.predict_padded(batch, sizes)
    assert ref_counts.min() > 5  # calibrated random weights give detections to compare
    # The best detections, where no other score is within rounding of theirs (near-ties may
    # swap ranks, and a box at a threshold may go either way, further down the list).
    top = ref_scores[:, :10]
    gaps = torch.diff(ref_scores[:, :11], dim=1).abs()
    apart = (gaps > 1e-3) & torch.cat([torch.ones_like(gaps[:, :1], dtype=torch.bool),
                                       gaps[:, :-1] > 1e-3], dim=1)  # fmt: skip
    assert apart.sum() >= 5
    torch.testing.assert_close(scores[:, :10][apart], top[apart], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxes[:, :10][apart], ref_boxes[:, :10][apart], rtol=1e-4, atol=1e-3)
    assert torch.equal(labels[:, :10][apart], ref_labels[:, :10][apart])


def _features(detector, images):
    """The maps the convolutions give: backbone, then the neck's when there is one."""
    features = detector.backbone(detector.normalize(images))
    if getattr(detector, "neck", None) is not None:
        features = detector.neck(features)
    return list(features.values()) if isinstance(features, dict) else list(features)


@pytest.mark.parametrize("norm", ["frozen", "batch"])
@torch.no_grad()
def test_resnet_fpn_trunk_folds_its_stem_and_every_block(norm):
    """torchvision's ResNet keeps conv/BatchNorm pairs as block attributes (conv1 -> bn1, ...)
    and the trunk's stem as children of the LayerGetter: all of them fold."""
    from detkit.models.backbones.rcnn_backbones import ResNetFPNBackbone

    gen = torch.Generator().manual_seed(2)
    trunk = ResNetFPNBackbone(depth=18, norm=norm).eval()
    kind = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    batch_norms = [m for m in trunk.modules() if isinstance(m, kind)]
    assert len(batch_norms) == 20  # stem + 8 blocks x 2 + 3 downsample branches
    for bn in batch_norms:
        _random_statistics(bn, gen)
    x = torch.rand(1, 3, 96, 128, generator=gen)
    expected = trunk(x)
    assert fuse_conv_bn(trunk) == 20
    assert not any(isinstance(m, kind) for m in trunk.modules())
    for mine, theirs in zip(trunk(x), expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))


def test_a_module_with_its_own_forward_keeps_its_batchnorm():
    """Attribute order says nothing about a custom forward's data flow: not folded, not even
    in a Sequential subclass that overrides ``forward``."""

    class PreActivation(nn.Module):  # bn(x) first, then conv: conv1 does not feed bn1
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv1(self.bn1(x))

    class Reversed(nn.Sequential):  # a Sequential whose forward runs its children backwards
        def forward(self, x):
            for module in reversed(self):
                x = module(x)
            return x

    model = nn.ModuleList([PreActivation(), Reversed(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))])
    model.eval()
    assert fuse_conv_bn(model) == 0
    assert isinstance(model[0].bn1, nn.BatchNorm2d) and isinstance(model[1][1], nn.BatchNorm2d)
