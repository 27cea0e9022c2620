"""Choosing a model chooses its paper transforms at its size; an explicit choice still wins.

Composed through the real packaged configs (``detkit.config.compose_config``), as the
commands compose them.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hydra.utils import instantiate

from detkit.config import CONFIG_DIR, compose_config

# Each packaged model and the transforms of its paper (SSD: SSD augmentation and a square
# resize; YOLO: letterbox; Faster R-CNN: shorter side to image_size, longer side capped).
FAMILY = {
    "ssd300_vgg16": "ssd",
    "ssd_digits": "ssd",
    "yolov1": "yolo",
    "yolov3": "yolo",
    "yolo_digits": "yolo",
    "yolov8": "yolo",
    "yolov8_digits": "yolo",
    "faster_rcnn_vgg16": "rcnn",
    "faster_rcnn_r50_fpn": "rcnn",
    "faster_rcnn_mbv3_fpn": "rcnn",
    "faster_rcnn_digits": "rcnn",
}
SIZE_KEY = {"ssd": "size", "yolo": "size", "rcnn": "min_size"}
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _transform_output(transform_cfg, height: int = 400, width: int = 800):
    """Image shape and boxes after the transform, for a wide image with a square box."""
    transform = instantiate(transform_cfg)
    image = np.full((height, width, 3), 90, np.uint8)
    boxes = np.array([[100.0, 100.0, 300.0, 300.0]], np.float32)
    tensor, out_boxes, _ = transform(image, boxes, np.zeros(1, np.int64))
    return tuple(tensor.shape[-2:]), out_boxes


def test_every_packaged_model_is_covered():
    assert {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")} == set(FAMILY)


@pytest.mark.parametrize("model", sorted(FAMILY))
def test_a_model_without_an_experiment_trains_with_its_own_transforms(model):
    cfg = compose_config("train", [f"model={model}"])
    family, size = FAMILY[model], cfg.model.image_size
    for split in ("train", "eval"):
        node = cfg.transforms[split]
        assert node._target_ == f"detkit.data.transforms.{family}_{split}"
        assert node[SIZE_KEY[family]] == size
    # The datasets get them too (data configs interpolate ${transforms.train|eval}).
    assert cfg.data.datamodule.train.transforms == cfg.transforms.train
    shape, boxes = _transform_output(cfg.transforms.train)
    (x1, y1, x2, y2) = boxes[0]
    if family == "ssd":  # random crops, then a square resize (eval: the resize alone)
        assert shape == (size, size)
        (x1, y1, x2, y2) = _transform_output(cfg.transforms.eval)[1][0]
        assert (y2 - y1) == pytest.approx(2 * (x2 - x1), rel=1e-3)  # the square box stretched
    elif family == "yolo":  # letterbox: square canvas, aspect kept
        assert shape == (size, size)
        assert (y2 - y1) == pytest.approx(x2 - x1, rel=1e-3)
        assert (x2 - x1) == pytest.approx(200 * size / 800, rel=1e-3)
    else:  # shorter side to size, longer side at most 5/3 of it, aspect kept
        scale = min(size / 400, round(size * 5 / 3) / 800)
        assert shape == (round(400 * scale), round(800 * scale))
        assert (x2 - x1) == pytest.approx(200 * scale, rel=1e-3)


def test_faster_rcnn_vgg16_gets_the_papers_600_by_at_most_1000():
    cfg = compose_config("train", ["model=faster_rcnn_vgg16"])
    assert _transform_output(cfg.transforms.train, 400, 800)[0] == (500, 1000)
    assert _transform_output(cfg.transforms.eval, 300, 400)[0] == (600, 800)


def test_the_transforms_follow_an_overridden_model_size():
    cfg = compose_config("train", ["model=yolov3", "model.image_size=608"])
    assert cfg.transforms.train.size == cfg.transforms.eval.size == 608


@pytest.mark.parametrize(
    ("model", "transforms"),
    [("faster_rcnn_vgg16", "ssd"), ("yolov3", "rcnn"), ("ssd300_vgg16", "yolo")],
)
def test_an_explicit_transforms_choice_wins_over_the_models(model, transforms):
    cfg = compose_config("train", [f"model={model}", f"transforms={transforms}"])
    assert cfg.transforms.train._target_ == f"detkit.data.transforms.{transforms}_train"
    assert cfg.transforms.eval[SIZE_KEY[transforms]] == cfg.model.image_size


def _experiment_choice(name: str, group: str) -> str:
    defaults = yaml.safe_load((CONFIG_DIR / "experiment" / f"{name}.yaml").read_text())["defaults"]
    (choice,) = [v for d in defaults for k, v in d.items() if k == f"override /{group}"]
    return choice


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_composes_with_the_transforms_it_names(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    transforms = _experiment_choice(experiment, "transforms")
    assert cfg.transforms.train._target_ == f"detkit.data.transforms.{transforms}_train"
    model = _experiment_choice(experiment, "model")
    assert cfg.model._target_ == compose_config("train", [f"model={model}"]).model._target_
    assert cfg.transforms.eval[SIZE_KEY[transforms]] == cfg.model.image_size


def test_a_users_experiment_pairing_another_models_transforms_wins(tmp_path, monkeypatch):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "yolo_with_ssd.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /model: yolov3\n  - override /transforms: ssd\n"
        "transforms:\n  train:\n    flip_p: 0.0\n"
    )
    monkeypatch.setenv("DETKIT_CONFIG_PATH", str(tmp_path))
    cfg = compose_config("train", ["experiment=yolo_with_ssd"])
    assert cfg.model._target_ == "detkit.models.detectors.yolo.YOLO"
    assert cfg.transforms.train._target_ == "detkit.data.transforms.ssd_train"
    assert cfg.transforms.train.size == 416 and cfg.transforms.train.flip_p == 0.0
    # ... and the command line wins over the experiment.
    cfg = compose_config("train", ["experiment=yolo_with_ssd", "transforms=rcnn"])
    assert cfg.transforms.train._target_ == "detkit.data.transforms.rcnn_train"


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("eval", []),
        ("eval", ["data=coco"]),
        ("eval", ["data=voc"]),
        ("predict", []),
        ("export", []),
        ("data_tool", []),
        *[("data_tool", [f"model={m}"]) for m in sorted(FAMILY)],
    ],
)
def test_the_other_commands_configs_compose(name, overrides):
    cfg = compose_config(name, overrides)
    assert cfg.task_name == ("data" if name == "data_tool" else name)
    if name == "data_tool":  # the model brings its transforms to browse
        family = FAMILY[overrides[0].split("=")[1]] if overrides else "yolo"
        assert cfg.transforms.train._target_ == f"detkit.data.transforms.{family}_train"
        assert cfg.data.datamodule.train.transforms == cfg.transforms.train
