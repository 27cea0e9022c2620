"""The model configs compose with Hydra and instantiate into working detectors."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from detkit.config import CONFIG_DIR as CONFIGS
from detkit.matching import DefaultBoxGenerator, HardNegativeSampler, SSDMatcher
from detkit.models import SSD
from detkit.models.backbones import (
    MobileNetV3Backbone,
    ResNet18Backbone,
    SmallBackbone,
    VGG16Backbone,
)


def _model_cfg(model: str, *overrides: str):
    # A stand-in primary config (just the model group) keeps this test independent of train.yaml.
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(overrides=[f"+model={model}", "+data.num_classes=10", *overrides])
    return cfg.model


def test_ssd300_vgg16_config_builds_the_paper_model():
    cfg = _model_cfg("ssd300_vgg16")
    assert cfg.num_classes == 10 and cfg.image_size == 300
    model = instantiate(cfg)
    assert isinstance(model, SSD) and isinstance(model.backbone, VGG16Backbone)
    assert isinstance(model.prior_generator, DefaultBoxGenerator)
    assert model.prior_generator((300, 300), [[s, s] for s in (38, 19, 10, 5, 3, 1)]).shape == (
        8732,
        4,
    )
    assert isinstance(model.loss.matcher, SSDMatcher) and model.loss.matcher.high_threshold == 0.5
    assert isinstance(model.loss.negative_sampler, HardNegativeSampler)
    assert model.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert model.head.num_classes == 10
    assert (model.score_threshold, model.nms_threshold) == (0.01, 0.45)
    assert (model.detections_per_image, model.topk_candidates_per_class) == (200, 400)


@pytest.mark.parametrize(
    ("backbone", "cls"),
    [
        ("small", SmallBackbone),
        ("mobilenet_v3", MobileNetV3Backbone),
        ("resnet18", ResNet18Backbone),
    ],
)
def test_ssd300_backbones_swap(backbone, cls):
    model = instantiate(_model_cfg("ssd300_vgg16", f"model/backbone={backbone}")).eval()
    assert isinstance(model.backbone, cls)
    if backbone == "small":  # one cheap pass: the swapped backbone fits the 8732 priors
        with torch.no_grad():
            features = model.backbone(torch.rand(1, 3, 300, 300))
            logits, _ = model.head(features)
        assert logits.shape == (1, 8732, 11)
        assert model.reference((300, 300), features).shape == (8732, 4)


def test_ssd_digits_config_trains_one_step():
    cfg = _model_cfg("ssd_digits")
    assert cfg.image_size == 256
    model = instantiate(cfg)
    assert isinstance(model.backbone, SmallBackbone) and model.num_classes == 10
    images = torch.rand(2, 3, 256, 256)
    targets = [
        {"boxes": torch.tensor([[20.0, 30.0, 45.0, 70.0]]), "labels": torch.tensor([7])},
        {"boxes": torch.tensor([[100.0, 90.0, 160.0, 190.0]]), "labels": torch.tensor([1])},
    ]
    out = model(images, targets)
    assert torch.isfinite(out.loss)
    out.loss.backward()
