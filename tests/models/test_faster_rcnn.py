"""Faster R-CNN end to end: torchvision equality, a short overfit, configs."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn,
)

from detkit.config import CONFIG_DIR as CONFIGS
from detkit.matching import (
    AnchorGenerator,
    BalancedPositiveNegativeSampler,
    DeltaXYWHCoder,
    Matcher,
)
from detkit.models.backbones.rcnn_backbones import WithFPN
from detkit.models.backbones.small import SmallBackbone
from detkit.models.detectors.faster_rcnn import FasterRCNN
from detkit.models.heads.roi_heads import FastRCNNPredictor, RoIHeads, RoIPooler, TwoMLPHead
from detkit.models.heads.rpn import RegionProposalNetwork, RPNHead
from detkit.testing import digits_batch, tie_order


def _torchvision(builder, height: int, width: int, **kw):
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None, num_classes=4, **kw)
    model.transform.min_size = (min(height, width),)
    model.transform.max_size = 10 * max(height, width)
    # A random backbone with BatchNorm's default statistics shrinks its maps to ~1e-8: every RoI
    # then pools the same features and nearly every detection ties on its score, so the order
    # (and the top-100 cut) would be arbitrary. Statistics measured on random images give maps
    # of unit scale; small box-head weights keep the softmax from saturating (ties at 1.0).
    for norm in model.backbone.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.reset_running_stats()
            norm.momentum = None
    model.backbone.train()
    with torch.no_grad():
        calibration, _ = model.transform(list(_images(4, height, width, seed=99)))
        model.backbone(calibration.tensors)
    model.backbone.eval()
    for parameter in model.roi_heads.parameters():
        torch.nn.init.normal_(parameter, std=0.01)
    return model


def _images(n: int, height: int, width: int, seed: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(n if seed is None else seed)
    return torch.rand(n, 3, height, width, generator=generator)


@pytest.mark.parametrize(
    ("builder", "height", "width"),
    [
        (fasterrcnn_mobilenet_v3_large_320_fpn, 224, 256),
        (fasterrcnn_mobilenet_v3_large_fpn, 160, 128),
        (fasterrcnn_resnet50_fpn, 64, 96),
    ],
)
def test_from_torchvision_detections_equal(builder, height: int, width: int) -> None:
    theirs = _torchvision(builder, height, width, box_score_thresh=0.0).eval()
    images = _images(2, height, width)
    batch, _ = theirs.transform(list(images))
    assert batch.tensors.shape == images.shape  # its resize/pad are the identity here
    ours = FasterRCNN.from_torchvision(theirs).eval()
    with torch.no_grad():
        expected = theirs(list(images))
        got = ours(images).detections
    for a, b in zip(got, expected, strict=True):
        assert len(torch.unique(b["scores"])) > 0.9 * len(b["scores"])  # not a field of ties
        assert len(a["boxes"]) == len(b["boxes"]) > 0
        # Exactly equal scores (a few, from the untrained head) come in an unspecified order
        # (torchvision's sort is not stable): compare them in one fixed order.
        a, b = (
            {k: d[k][tie_order(d["scores"], d["labels"], d["boxes"])] for k in d} for d in (a, b)
        )
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-5, rtol=0)
        assert torch.equal(a["labels"], b["labels"] - 1)


def test_training_losses_equal_torchvision() -> None:
    """With samplers taking every labelled anchor/RoI, losses are deterministic and equal."""
    theirs = _torchvision(fasterrcnn_mobilenet_v3_large_320_fpn, 128, 128)
    for sampler in (theirs.rpn.fg_bg_sampler, theirs.roi_heads.fg_bg_sampler):
        sampler.batch_size_per_image, sampler.positive_fraction = 10**6, 1.0
    ours = FasterRCNN.from_torchvision(theirs).train()
    images = _images(2, 128, 128)
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[0.0, 0.0, 120.0, 100.0], [40.0, 40.0, 80.0, 100.0]]),
         "labels": torch.tensor([0, 2])},
    ]  # fmt: skip
    tv_targets = [{**t, "labels": t["labels"] + 1} for t in targets]
    expected = theirs.train()(list(images), tv_targets)
    out = ours(images, targets)
    names = {"rpn_objectness": "loss_objectness", "rpn_box_regression": "loss_rpn_box_reg",
             "classification": "loss_classifier", "box_regression": "loss_box_reg"}  # fmt: skip
    assert set(out.losses) == set(names)
    for key, theirs_key in names.items():
        torch.testing.assert_close(out.losses[key], expected[theirs_key], rtol=1e-4, atol=1e-6)
    out.loss.backward()
    assert ours.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def _tiny_model(num_classes: int = 2, image_size: int = 80) -> FasterRCNN:
    torch.manual_seed(0)
    backbone = WithFPN(SmallBackbone((8, 16), (24, 32), (1, 1), 0), 32, extra_pool=False)
    rpn = RegionProposalNetwork(
        AnchorGenerator(((24, 32), (40, 56)), ((0.5, 1.0, 2.0),) * 2), RPNHead(32, 6),
        Matcher(0.7, 0.3, True), BalancedPositiveNegativeSampler(256, 0.5), DeltaXYWHCoder(),
        topk_candidates_per_level_train=200, proposals_per_image_train=100,
        topk_candidates_per_level_test=100, proposals_per_image_test=50,
    )  # fmt: skip
    heads = RoIHeads(
        RoIPooler(7, 2, levels=[0, 1], canonical_scale=32), TwoMLPHead(32, 7, 64),
        FastRCNNPredictor(64, num_classes), Matcher(0.5, 0.5, False),
        BalancedPositiveNegativeSampler(64, 0.25), DeltaXYWHCoder((10.0, 10.0, 5.0, 5.0)),
    )  # fmt: skip
    return FasterRCNN(backbone, rpn, heads, num_classes=num_classes, image_size=image_size)


@pytest.mark.usefixtures("one_thread")
def test_overfits_a_few_digits_images_to_high_ap50() -> None:
    from torchmetrics.detection import MeanAveragePrecision

    images, targets = digits_batch(4, image_size=128)  # 18 handwritten digits, 10 classes
    model = _tiny_model(num_classes=10, image_size=128)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(images, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        detections = model.eval()(images).detections
    metric = MeanAveragePrecision(backend="pycocotools")  # the COCO reference tool as oracle
    metric.update(detections, targets)
    assert float(metric.compute()["map_50"]) > 0.9


def test_bad_inputs_raise_clear_errors() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match="targets"):
        model.train()(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="2 images but 1 targets"):
        model(torch.rand(2, 3, 64, 64), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(ValueError, match="num_classes"):
        FasterRCNN(model.backbone, model.rpn, model.roi_heads, num_classes=5)


@pytest.mark.parametrize(
    "model_name",
    ["faster_rcnn_digits", "faster_rcnn_vgg16", "faster_rcnn_r50_fpn", "faster_rcnn_mbv3_fpn"],
)
def test_model_configs_instantiate(model_name: str) -> None:
    from hydra.utils import instantiate

    from detkit.config import compose_config

    # Through Hydra: a model config's defaults list also picks its transforms.
    cfg = compose_config("train", [f"model={model_name}", "data.num_classes=10"])
    model = instantiate(cfg.model)
    assert isinstance(model, FasterRCNN) and model.num_classes == 10
    assert model.roi_heads.box_predictor.cls_score.out_features == 11
    if model_name == "faster_rcnn_digits":
        with torch.no_grad():
            out = model.eval()(torch.rand(1, 3, 256, 256))
        assert len(out.detections) == 1


@pytest.mark.parametrize(
    "experiment", ["digits_faster_rcnn", "voc_faster_rcnn", "coco_faster_rcnn"]
)
def test_experiments_compose_with_train_config(experiment: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.model._target_ == "detkit.models.detectors.faster_rcnn.FasterRCNN"
    assert cfg.transforms.train._target_ == "detkit.data.transforms.rcnn_train"
    assert cfg.transforms.eval.min_size == cfg.model.image_size
    if experiment == "digits_faster_rcnn":
        model = instantiate(cfg.model)
        assert model.num_classes == cfg.data.num_classes == 10
        assert cfg.transforms.train.flip_p == 0.0


def test_train_command_runs_digits_faster_rcnn(tmp_path) -> None:
    """`detkit train experiment=digits_faster_rcnn` end to end on a tiny set (1 epoch)."""
    import json

    from detkit import cli

    code = cli.main(
        [
            "train",
            "experiment=digits_faster_rcnn",
            "trainer.max_epochs=1",
            f"data.root={tmp_path / 'digits'}",
            "data.n_train=4",
            "data.n_val=2",
            "data.datamodule.batch_size=2",
            "data.datamodule.num_workers=0",
            "callbacks.progress_bar=null",
            "evaluate=false",
            f"hydra.run.dir={tmp_path / 'train'}",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["steps"] == 2 and "val/mAP" in summary["val"]
    assert (tmp_path / "train" / "checkpoints" / "last.ckpt").is_file()
