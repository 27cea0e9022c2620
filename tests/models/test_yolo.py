"""The YOLO detectors: parts' shapes and order, decoding, forward modes, post-processing against
torchvision's NMS, Hydra configs, a Lightning fast_dev_run and a short overfit (pycocotools AP)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from detkit.matching import (
    AnchorPoints,
    DistanceCoder,
    YOLOPriors,
    YOLOv1Coder,
    YOLOv1Grid,
    YOLOv3Coder,
)
from detkit.models.backbones.darknet import CSPDarknet, TrunkLevels
from detkit.models.detectors.yolo import YOLO, yolov1, yolov3, yolov8
from detkit.models.heads.yolo import (
    YOLOv1Head,
    YOLOv1Output,
    YOLOv3Head,
    YOLOv3Output,
    YOLOv8Head,
    YOLOv8Output,
)
from detkit.models.necks.yolo_pan import YOLOPAN
from detkit.structures import unpad_detections
from detkit.testing import digits_batch

ANCHORS = (
    ((8, 8), (12, 20), (20, 12)),
    ((20, 20), (24, 40), (40, 24)),
    ((40, 40), (60, 60), (90, 90)),
)
TINY = (8, 16, 32, 64, 128)


pytestmark = pytest.mark.usefixtures("one_thread")


def _target(boxes, labels):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _tiny_v3(num_classes=3, size=64, **kwargs) -> YOLO:
    return yolov3(num_classes, size, CSPDarknet(TINY), YOLOPriors(ANCHORS), **kwargs)


def test_backbones_and_neck_give_strides_8_16_32():
    from detkit.models.backbones import ResNet18Backbone

    images = torch.rand(1, 3, 64, 96)
    for backbone in (CSPDarknet(TINY), TrunkLevels(ResNet18Backbone())):
        feats = backbone(images)
        assert [tuple(f.shape[-2:]) for f in feats] == [(8, 12), (4, 6), (2, 3)]
        assert [f.shape[1] for f in feats] == backbone.out_channels
        for bottom_up in (False, True):
            neck = YOLOPAN(backbone.out_channels, [16, 24, 32], bottom_up=bottom_up)
            outs = neck(feats)
            assert [tuple(o.shape[1:]) for o in outs] == [(16, 8, 12), (24, 4, 6), (32, 2, 3)]
    assert CSPDarknet(TINY, out_stages=(4,))(images)[0].shape == (1, 128, 2, 3)
    with pytest.raises(ValueError, match="depths"):
        CSPDarknet(TINY, depths=(1, 1))


def test_neck_without_top_block_passes_the_coarsest_map_to_the_top_down_path():
    torch.manual_seed(0)
    feats = [torch.rand(1, 16, 8, 8), torch.rand(1, 32, 4, 4)]
    for bottom_up in (False, True):
        neck = YOLOPAN([16, 32], bottom_up=bottom_up, depth=0, top_block=False).eval()
        assert isinstance(neck.top, torch.nn.Identity)
        with torch.no_grad():
            outs = neck(feats)
            finer = neck.fuse_down[0](
                torch.cat((F.interpolate(neck.reduce[0](feats[1]), size=(8, 8)), feats[0]), 1)
            )
        assert [tuple(o.shape[1:]) for o in outs] == [(16, 8, 8), (32, 4, 4)]
        assert torch.equal(outs[0], finer)
        if not bottom_up:  # the coarsest map comes out untouched
            assert torch.equal(outs[1], feats[1])
    with pytest.raises(ValueError, match="without top_block the coarsest map keeps its 32"):
        YOLOPAN([16, 32], [16, 24], top_block=False)


def test_patch_stem_sees_each_4x4_patch_once_and_gives_strides_8_16_32():
    torch.manual_seed(0)
    trunk = CSPDarknet(TINY[1:], depths=(1, 1, 1), out_stages=(1, 2, 3), stem_stride=4).eval()
    images = torch.rand(2, 3, 64, 96)
    feats = trunk(images)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 8, 12), (64, 4, 6), (128, 2, 3)]
    stem = trunk.stages[0]
    assert tuple(stem(images).shape) == (2, 16, 16, 24)
    # A pixel changes exactly the stem output of its own patch (no overlap, no padding).
    changed = images.clone()
    changed[:, :, 5, 9] += 1.0  # patch (1, 2)
    with torch.no_grad():
        moved = (stem(changed) - stem(images)).abs().amax(dim=(0, 1)) > 0
    assert moved.nonzero().tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="stem_stride must be 2 or 4, got 3"):
        CSPDarknet(TINY, stem_stride=3)


@pytest.mark.parametrize("activation", ["relu", "hardswish", "silu"])
def test_activation_reaches_every_convolution_of_trunk_neck_and_head(activation):
    from detkit.models.backbones.darknet import ACTIVATIONS

    trunk = CSPDarknet(TINY, activation=activation)
    neck = YOLOPAN(trunk.out_channels, bottom_up=True, depth=1, activation=activation)
    head = YOLOv8Head(neck.out_channels, 3, box_branch="conv", class_branch="depthwise",
                      activation=activation)  # fmt: skip
    chosen = ACTIVATIONS[activation]
    for part in (trunk, neck, head):
        acts = [m for m in part.modules() if isinstance(m, tuple(ACTIVATIONS.values()))]
        convs = [m for m in part.modules() if isinstance(m, torch.nn.Conv2d)]
        # every convolution but the head's 1x1 predictors is followed by the activation
        predictors = 2 * len(neck.out_channels) if part is head else 0
        assert len(acts) == len(convs) - predictors
        assert all(type(m) is chosen for m in acts)
    out = head(neck(trunk(torch.rand(1, 3, 64, 64))))
    assert torch.isfinite(out.box).all() and torch.isfinite(out.class_logits).all()
    with pytest.raises(ValueError, match="activation 'gelu' is not one of"):
        CSPDarknet(TINY, activation="gelu")


def test_v3_head_flattens_in_prior_order_and_decodes_zero_to_priors():
    priors, c = YOLOPriors(ANCHORS), 2
    cols = 3 * (5 + c)
    head = YOLOv3Head([cols] * 3, priors.num_anchors_per_location(), c)
    for conv in head.predictors:  # identity 1x1 conv: raw values are the input features
        conv.weight.data.copy_(torch.eye(cols).view(cols, cols, 1, 1))
        conv.bias.data.zero_()
    feats = [torch.randn(2, cols, 64 // s, 96 // s) for s in (8, 16, 32)]
    out = head(feats)
    raw = torch.cat((out.box, out.objectness[..., None], out.class_logits), dim=-1)
    grid = priors((64, 96), [f.shape[-2:] for f in feats])
    assert raw.shape == (2, len(grid.stride), 5 + c)
    for p in torch.randint(0, len(grid.stride), (50,)).tolist():
        level, anchor = int(grid.level[p]), int(grid.anchor_index[p])
        col, row = grid.grid_xy[p].long().tolist()
        expected = feats[level][1, anchor * (5 + c) : (anchor + 1) * (5 + c), row, col]
        assert torch.equal(raw[1, p], expected)
    zero = YOLOv3Output(*(torch.zeros_like(t) for t in out))
    boxes, scores = YOLOv3Coder().decode(grid, zero.box), head.scores(zero)
    torch.testing.assert_close(boxes[0], grid.boxes())
    torch.testing.assert_close(scores, torch.full_like(scores, 0.25))


def test_v8_head_flattens_in_anchor_point_order_and_decodes_uniform_to_mid_range():
    c, reg_max = 3, 4
    head = YOLOv8Head([8, 8, 8], c, reg_max, box_channels=8, class_channels=8).eval()
    feats = [torch.randn(2, 8, 64 // s, 96 // s) for s in (8, 16, 32)]
    out = head(feats)
    grid = AnchorPoints((8, 16, 32))((64, 96), [f.shape[-2:] for f in feats])
    assert out.box.shape == (2, len(grid.points), 4, reg_max)
    assert out.class_logits.shape == (2, len(grid.points), c)
    for p in torch.randint(0, len(grid.points), (30,)).tolist():
        level = [8.0, 16.0, 32.0].index(float(grid.stride[p]))
        col, row = (grid.points[p] / grid.stride[p] - 0.5).long().tolist()
        box_map = head.box_branches[level](feats[level])[1, :, row, col]
        torch.testing.assert_close(out.box[1, p], box_map.view(4, reg_max))
        class_map = head.class_branches[level](feats[level])[1, :, row, col]
        torch.testing.assert_close(out.class_logits[1, p], class_map)
    uniform = YOLOv8Output(torch.zeros_like(out.box), torch.zeros_like(out.class_logits))
    boxes = DistanceCoder(reg_max).decode(grid, uniform.box)  # 1.5 strides on every side
    half = 1.5 * grid.stride[:, None]
    torch.testing.assert_close(boxes[0], torch.cat((grid.points - half, grid.points + half), 1))
    torch.testing.assert_close(head.scores(uniform), torch.full_like(out.class_logits, 0.5))


def test_v1_decode_is_class_probability_times_confidence():
    s, k, c = 3, 2, 4
    head = YOLOv1Head(8, c, grid_size=s, num_boxes=k)
    raw = YOLOv1Output(
        torch.rand(1, s, s, k, 4), torch.rand(1, s, s, k), torch.rand(1, s, s, c).softmax(-1)
    )
    boxes = YOLOv1Coder().decode(YOLOv1Grid(s)((90, 60)), raw.box).reshape(1, -1, 4)
    scores = head.scores(raw).reshape(1, -1, c)
    # cell (row 1, col 2), predictor 1: box centre ((x + 2) 60 / 3, (y + 1) 90 / 3)
    x, y, sw, sh = raw.box[0, 1, 2, 1].tolist()
    cx, cy, w, h = (x + 2) * 20, (y + 1) * 30, sw**2 * 60, sh**2 * 90
    index = (1 * s + 2) * k + 1
    torch.testing.assert_close(
        boxes[0, index], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    )
    torch.testing.assert_close(
        scores[0, index], raw.class_prob[0, 1, 2] * raw.confidence[0, 1, 2, 1]
    )
    out = head(torch.rand(2, 8, 10, 10))  # stride 2 gives 5x5: a larger map pools to S x S
    assert out.box.shape == (2, s, s, k, 4) and out.class_prob.shape == (2, s, s, c)
    assert out.class_prob.sum(-1).allclose(torch.ones(2, s, s))
    with pytest.raises(ValueError, match="smaller than the 3x3 grid"):
        head(torch.rand(1, 8, 4, 4))  # 2x2 after the stride-2 conv: stretching is refused


LOSS_TERMS = {
    "v1": {"box_regression", "objectness", "classification"},
    "v3": {"box_regression", "objectness", "classification"},
    "v8": {"box_regression", "distribution_focal", "classification"},
}


@pytest.mark.parametrize("version", ["v1", "v3", "v8"])
def test_forward_modes_and_bad_input(version):
    if version == "v1":
        model = yolov1(
            3, 64, CSPDarknet(TINY, out_stages=(4,)), grid_size=2, downsample=False,
            detections_per_image=7,
        )  # fmt: skip
    elif version == "v8":
        model = yolov8(3, 64, CSPDarknet(TINY), detections_per_image=7)
    else:
        model = _tiny_v3(detections_per_image=7, score_threshold=1e-6)
    images = torch.rand(2, 3, 64, 64)
    targets = [_target([[4, 6, 30, 40]], [2]), _target([], [])]
    out = model(images, targets)
    assert set(out.losses) == LOSS_TERMS[version]
    assert out.detections is None
    model.eval()
    out = model(images)
    assert not out.losses and len(out.detections) == 2
    for det in out.detections:
        assert len(det["boxes"]) <= 7 and det["labels"].dtype == torch.int64
        assert det["labels"].min() >= 0 and det["labels"].max() < 3
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 64).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
    both = model(images, targets)
    assert both.losses and both.detections is not None
    with pytest.raises(ValueError, match="B, 3, H, W"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="targets"):
        model(images, targets[:1])
    model.train()
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    with pytest.raises(ValueError, match="classes"):
        head = YOLOv3Head([32, 64, 128], [3, 3, 3], 5)
        YOLO(CSPDarknet(TINY), head, YOLOPriors(ANCHORS), YOLOv3Coder(), None, 3)


@pytest.mark.parametrize("every_box", [True, False], ids=["every-box", "candidates-only"])
def test_postprocess_equals_threshold_then_torchvision_batched_nms(every_box):
    model = _tiny_v3(
        num_classes=3,
        size=96,
        score_threshold=0.2,
        nms_threshold=0.5,
        topk_candidates_per_image=10_000,
    ).eval()
    # Continuous random logits: no score ties, so the order of equal scores cannot differ.
    raw = torch.randn(2, sum(3 * (96 // s) ** 2 for s in (8, 16, 32)), 8)
    outputs = YOLOv3Output(raw[..., :4], raw[..., 4], raw[..., 5:])
    grid = model.prior_generator((96, 96))
    candidates = model.decode(outputs, grid, (96, 96), every_box=every_box)
    detections = unpad_detections(*model.select(*candidates))
    boxes = YOLOv3Coder().decode(grid, outputs.box).clamp(0, 96)
    scores = YOLOv3Head.scores(outputs)
    for b, det in enumerate(detections):
        idx, label = (scores[b] > 0.2).nonzero(as_tuple=True)
        cand_boxes, cand_scores = boxes[b][idx], scores[b][idx, label]
        keep = batched_nms(cand_boxes, cand_scores, label, 0.5)[: model.detections_per_image]
        assert len(keep) > 3
        torch.testing.assert_close(det["scores"], cand_scores[keep])
        torch.testing.assert_close(det["boxes"], cand_boxes[keep])
        assert torch.equal(det["labels"], label[keep])


@pytest.mark.parametrize("version", ["v3", "v8"])
def test_candidates_only_decode_equals_every_box_decode_where_selection_reads(version):
    # Selection reads the boxes of (box, class) pairs above the score threshold only: those
    # are decoded bit for bit as when decoding every box, the others are zeros, detections
    # (eager forward, predict_padded) equal selecting from every box.
    torch.manual_seed(0)
    if version == "v8":
        model = yolov8(3, 128, CSPDarknet(TINY)).eval()
        for branch in model.head.box_branches:  # boxes of all sizes, not the initial mid-range
            torch.nn.init.normal_(branch[-1].weight, std=0.3)
    else:
        model = _tiny_v3(size=128).eval()
    images = torch.rand(2, 3, 128, 128)
    sizes = torch.tensor([[128, 128], [80, 112]])
    boxes, scores = model.predict_candidates(images, sizes)
    # An untrained model's scores sit near its prior: a threshold leaving a tenth of the boxes.
    model.score_threshold = float(scores.amax(-1).quantile(0.9))
    sparse_boxes, sparse_scores = model.predict_candidates(images, sizes, every_box=False)
    read = (scores > model.score_threshold).any(-1)
    assert 0 < int(read.sum()) < read.numel() // 2
    assert torch.equal(sparse_scores, scores)
    assert torch.equal(sparse_boxes[read], boxes[read])
    assert not sparse_boxes[~read].any()
    expected = model.select(boxes, scores)
    for got in (model.predict_padded(images, sizes), model.select(sparse_boxes, sparse_scores)):
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    eager = model(images).detections
    padded = unpad_detections(*model.select(*model.predict_candidates(images)))
    for a, b in zip(eager, padded, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from detkit.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    return cfg, instantiate(cfg.model)


# the first digits default, kept in model/yolov8_digits.yaml's comment: 3x3 stride-2 stem, SiLU
THREE_BY_THREE_STEM = [
    "model.backbone.stem_stride=2",
    "model.backbone.widths=[16,32,64,96,128]",
    "model.backbone.depths=[1,1,1,1]",
    "model.backbone.out_stages=[2,3,4]",
    "model.backbone.activation=silu",
    "model.backbone.spp=true",
    "model.neck.in_channels=[64,96,128]",
    "model.neck.depth=1",
    "model.neck.top_block=true",
    "model.prior_generator.strides=[8,16,32]",
]


@pytest.mark.parametrize(
    "overrides, num_classes, size, head",
    [
        (["experiment=digits_yolo"], 10, 256, YOLOv8Head),
        (["experiment=digits_yolo", "model=yolo_digits"], 10, 256, YOLOv3Head),
        (["experiment=digits_yolo", *THREE_BY_THREE_STEM], 10, 256, YOLOv8Head),
        (["model=yolov8"], 10, 640, YOLOv8Head),
        (["model=yolov1"], 10, 448, YOLOv1Head),
        (["model=yolov3"], 10, 416, YOLOv3Head),
        (["experiment=voc_yolov3"], 20, 416, YOLOv3Head),
        (["experiment=coco_yolov3"], 80, 416, YOLOv3Head),
    ],
)
def test_configs_compose_and_instantiate(overrides, num_classes, size, head):
    cfg, model = _compose(overrides)
    assert isinstance(model, YOLO) and isinstance(model.head, head)
    assert model.num_classes == num_classes and model.image_size == (size, size)
    assert cfg.transforms.train.size == size
    if overrides[0] == "experiment=digits_yolo":
        levels = 3 if head is YOLOv3Head or "model.backbone.out_stages=[2,3,4]" in overrides else 2
        assert cfg.model.prior_generator.strides == [8, 16, 32][:levels]
        assert cfg.transforms.train.flip_p == 0.0
        out = model(torch.rand(1, 3, 64, 64), [_target([[4, 6, 30, 40]], [7])])
        assert torch.isfinite(out.loss)
        maps = model.backbone(torch.rand(1, 3, 64, 64))
        assert [tuple(m.shape[-2:]) for m in maps] == [(8, 8), (4, 4), (2, 2)][:levels]
    if overrides[0] == "experiment=digits_yolo" and head is YOLOv8Head:
        # the neck and head follow the backbone's activation
        wanted = (
            torch.nn.SiLU if "model.backbone.activation=silu" in overrides else torch.nn.Hardswish
        )
        acts = {
            type(m) for m in model.modules() if isinstance(m, (torch.nn.SiLU, torch.nn.Hardswish))
        }
        assert acts == {wanted}
    if overrides == ["model=yolov1"]:
        assert model.head.grid_size == 7 and model.head.num_boxes == 2
        assert model.loss.lambda_coord == 5.0 and model.loss.lambda_noobj == 0.5


def test_lightning_fast_dev_run():
    import lightning as L

    from detkit.data import collate
    from detkit.engine.module import DetectionModule

    model = _tiny_v3(num_classes=3, size=64)
    batch = [
        (torch.rand(3, 64, 64), {**_target([[4, 6, 30, 40]], [1]), "image_id": i}) for i in range(4)
    ]
    loader = torch.utils.data.DataLoader(batch, batch_size=2, collate_fn=collate)
    module = DetectionModule(model, lambda params: torch.optim.SGD(params, lr=0.01))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.fit(module, loader, loader)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _precise_batchnorm(model, images):
    """Re-estimate BatchNorm statistics with the final weights (a few steps of training leave
    the running averages far behind the weights)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(images, return_detections=True)


@pytest.mark.parametrize("version", ["v1", "v3", "v8"])
def test_overfit_a_few_digits_images_reaches_high_ap50(version):
    from torchmetrics.detection import MeanAveragePrecision

    images, targets = digits_batch(4, image_size=128)  # 18 handwritten digits, 10 classes
    torch.manual_seed(0)
    if version == "v1":  # a 4x4 grid of 32-px cells, two predictors each
        trunk = CSPDarknet(TINY, out_stages=(4,))
        model = yolov1(10, 128, trunk, grid_size=4, downsample=False)
    elif version == "v3":
        model = _tiny_v3(num_classes=10, size=128)
    else:  # anchor-free: distances with DFL, task-aligned assignment
        model = yolov8(10, 128, CSPDarknet(TINY), reg_max=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(50):
        loss = model(images, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _precise_batchnorm(model, images)
    with torch.no_grad():
        detections = model.eval()(images).detections
    metric = MeanAveragePrecision(backend="pycocotools")  # the COCO reference tool as oracle
    metric.update(detections, targets)
    # v1 predicts one class per cell and two of these digits share a cell: at most ~0.96
    assert float(metric.compute()["map_50"]) > 0.9
