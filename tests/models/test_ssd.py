"""The SSD detector: outputs, priors, modes, torchvision equality and a tiny overfit."""

import pytest
import torch
from torchvision.models.detection import ssd300_vgg16
from torchvision.ops import box_iou

from detkit.matching import DefaultBoxGenerator
from detkit.models import SSD
from detkit.models.backbones import SmallBackbone
from detkit.models.detectors.ssd import ssd, ssd300_priors
from detkit.structures import DetectorOutput


def _small_ssd(num_classes=3, **kwargs):
    backbone = SmallBackbone((8, 16), (16, 24, 32), level_depth=1, valid_tail=0)
    priors = DefaultBoxGenerator([[2], [2], [2]], scales=[0.15, 0.3, 0.55, 0.8])
    return ssd(backbone, num_classes, image_size=128, prior_generator=priors, **kwargs)


def _targets(batch):
    boxes = torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 60.0, 120.0, 110.0]])
    return [{"boxes": boxes[: 1 + i % 2], "labels": torch.tensor([2, 0])[: 1 + i % 2]}
            for i in range(batch)]  # fmt: skip


def test_ssd300_has_8732_default_boxes():
    sizes = [[s, s] for s in (38, 19, 10, 5, 3, 1)]
    assert ssd300_priors()((300, 300), sizes).shape == (8732, 4)
    small = SmallBackbone()  # same map sizes as VGG16 at 300, far cheaper to run
    model = ssd(small, num_classes=5).eval()
    with torch.no_grad():
        features = small(torch.rand(1, 3, 300, 300))
        logits, deltas = model.head(features)
    assert model.reference((300, 300), features).shape == (8732, 4)
    assert logits.shape == (1, 8732, 6) and deltas.shape == (1, 8732, 4)


def test_train_mode_returns_losses_only():
    model = _small_ssd().train()
    out = model(torch.rand(2, 3, 128, 128), _targets(2))
    assert isinstance(out, DetectorOutput) and out.detections is None
    assert set(out.losses) == {"box_regression", "classification"}
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.head.predictors[0].weight.grad.abs().sum() > 0
    assert model.backbone.stem[0][0].weight.grad.abs().sum() > 0


def test_eval_with_targets_gives_losses_and_detections():
    model = _small_ssd(detections_per_image=7).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 128), _targets(2))
    assert set(out.losses) == {"box_regression", "classification"}
    assert len(out.detections) == 2
    for det in out.detections:
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) <= 7
        assert det["labels"].dtype == torch.int64
        assert ((det["labels"] >= 0) & (det["labels"] < 3)).all()  # background never leaks
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 128).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()


@torch.no_grad()
def test_predict_padded_matches_detections():
    model = _small_ssd(detections_per_image=5).eval()
    images = torch.rand(2, 3, 128, 128)
    boxes, scores, labels, num = model.predict_padded(images)
    assert boxes.shape == (2, 5, 4) and scores.shape == labels.shape == (2, 5)
    for i, det in enumerate(model(images).detections):
        n = int(num[i])
        torch.testing.assert_close(det["boxes"], boxes[i, :n])
        torch.testing.assert_close(det["scores"], scores[i, :n])


def test_priors_follow_the_input_size_and_are_cached():
    model = _small_ssd().eval()
    with torch.no_grad():
        for size in (128, 96, 160):
            out = model(torch.rand(1, 3, size, size + 32), return_detections=True)
            assert (out.detections[0]["boxes"][:, 2] <= size + 32).all()
    assert len(model._references) == 3


def test_bad_inputs_raise_clear_errors():
    model = _small_ssd()
    with pytest.raises(ValueError, match="training mode needs targets"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(3, 64, 64), _targets(1))
    with pytest.raises(ValueError, match="1 images but 2 targets"):
        model(torch.rand(1, 3, 64, 64), _targets(2))
    with pytest.raises(ValueError, match="3 feature maps"):
        ssd(SmallBackbone((8, 16), (8, 8, 8), level_depth=1, valid_tail=0), 3)


@torch.no_grad()
def test_from_torchvision_gives_the_same_detections():
    theirs = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=4).eval()
    # Shrink the random predictors so softmax does not saturate at 1.0 (ties order arbitrarily).
    for conv in theirs.head.classification_head.module_list:
        conv.weight.mul_(0.05)
    for conv in theirs.head.regression_head.module_list:
        conv.weight.mul_(0.02)
    ours = SSD.from_torchvision(theirs).eval()
    assert ours.num_classes == 3
    images = torch.rand(2, 3, 300, 300)
    expected = theirs(list(images))
    got = ours(images).detections
    for e, g in zip(expected, got, strict=True):
        assert len(e["boxes"]) == len(g["boxes"]) > 0
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["scores"], e["scores"])
        assert torch.equal(g["labels"], e["labels"] - 1)


def _rectangle_images():
    colours = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.2, 0.3, 1.0]])
    layouts = [
        [(0, (8, 10, 48, 60)), (2, (70, 70, 120, 110))],
        [(1, (30, 20, 100, 70))],
        [(2, (5, 80, 40, 122)), (0, (60, 8, 96, 44)), (1, (80, 70, 124, 124))],
        [(1, (16, 16, 60, 110))],
    ]
    images, targets = torch.full((4, 3, 128, 128), 0.1), []
    for img, layout in zip(images, layouts, strict=True):
        for label, (x1, y1, x2, y2) in layout:
            img[:, y1:y2, x1:x2] = colours[label].view(3, 1, 1)
        targets.append({"boxes": torch.tensor([b for _, b in layout], dtype=torch.float32),
                        "labels": torch.tensor([c for c, _ in layout])})  # fmt: skip
    return images, targets


def test_overfits_a_few_rectangle_images():
    images, targets = _rectangle_images()
    model = _small_ssd(num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model(images, targets).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(images).detections
    for det, target in zip(detections, targets, strict=True):
        confident = det["scores"] > 0.5
        boxes, labels = det["boxes"][confident], det["labels"][confident]
        iou = box_iou(target["boxes"], boxes)
        same_class = target["labels"][:, None] == labels[None, :]
        best = (iou * same_class).max(dim=1).values
        assert (best > 0.8).all(), (best, det["scores"][:5])


@torch.no_grad()
def test_pretrained_torchvision_copies_backbone_and_box_regressors(monkeypatch):
    import torchvision.models.detection as tv_detection

    from detkit.models.backbones import VGG16Backbone

    coco = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=4)
    monkeypatch.setattr(tv_detection, "ssd300_vgg16", lambda weights: coco)  # no download
    with pytest.warns(UserWarning, match="classifier starts from scratch"):
        model = ssd(VGG16Backbone(), num_classes=2, pretrained="torchvision")
    torch.testing.assert_close(model.backbone.extra[1][2].weight, coco.backbone.extra[1][2].weight)
    fused = model.head.predictors[0].weight.view(4, 7, 512, 3, 3)  # 4 boxes x (3 logits + 4)
    reg = coco.head.regression_head.module_list[0].weight.view(4, 4, 512, 3, 3)
    torch.testing.assert_close(fused[:, 3:], reg)
    cls = coco.head.classification_head.module_list[0].weight  # 4 logits: not copied into 3
    assert not torch.equal(fused[:, :3], cls.view(4, 4, 512, 3, 3)[:, :3])
    torch.testing.assert_close(model.normalize.std.flatten(), torch.full((3,), 1 / 255))
    with pytest.raises(ValueError, match="vgg16 backbone"):
        ssd(SmallBackbone(), 2, pretrained="torchvision")
    with pytest.raises(ValueError, match="pretrained="):
        ssd(SmallBackbone(), 2, pretrained="imagenet")
