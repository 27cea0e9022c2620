"""``detkit data`` actions through the real configs (Hydra compose)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from detkit.config import compose_config
from detkit.data import COCODetection, DetectionDataModule
from detkit.data.command import run
from detkit.matching import fit_anchors_from_dataset


def data_tool_cfg(overrides: list[str]):
    return compose_config("data_tool", overrides)


def small(root: Path) -> list[str]:
    return [f"data.root={root}", "data.n_train=6", "data.n_val=3", "data.image_size=96"]


def test_digits_browse_and_stats(tmp_path, capsys):
    out = tmp_path / "digits"
    run(data_tool_cfg(["action=digits", f"out={out}", "n_train=6", "n_val=3", "image_size=96"]))
    assert "digits dataset ready" in capsys.readouterr().out
    assert len(list((out / "train").glob("*.png"))) == 6
    grid = tmp_path / "grid.png"
    run(data_tool_cfg(["action=browse", "n=4", "columns=2", f"file={grid}", *small(out)]))
    # after the default model's (yolo_digits) train transforms: letterboxed to its 256 px
    assert Image.open(grid).size == (2 * 256, 2 * 256)
    run(data_tool_cfg(["action=browse", "n=4", "columns=2", "raw=true", f"file={grid}",
                       *small(out)]))  # fmt: skip
    assert Image.open(grid).size == (2 * 96, 2 * 96)
    run(data_tool_cfg(["action=stats", "split=val", *small(out)]))
    printed = capsys.readouterr().out
    assert "3 images" in printed and "boxes per class" in printed
    run(data_tool_cfg(["action=anchors", "k=3", "model.image_size=192", *small(out)]))
    anchors = ast.literal_eval(capsys.readouterr().out.splitlines()[-1])  # a list of [w, h]
    assert len(anchors) == 3 and all(0 < w < 192 and 0 < h < 192 for w, h in anchors)
    with pytest.raises(ValueError, match="unknown data action"):
        run(data_tool_cfg(["action=nope", *small(out)]))


@pytest.mark.parametrize("transforms", ["ssd", "yolo", "rcnn"])
def test_data_config_builds_a_datamodule(tmp_path, transforms):
    cfg = data_tool_cfg([f"transforms={transforms}", "model.image_size=64", *small(tmp_path)])
    dm = instantiate(cfg.data.datamodule, num_workers=0)
    assert isinstance(dm, DetectionDataModule) and dm.num_classes == cfg.data.num_classes == 10
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape[0] == 3 and len(targets) == 3
    assert dm.val_dataset.to_coco()["categories"][0] == {"id": 1, "name": "0"}


@pytest.mark.parametrize("name", ["coco", "voc", "yolo"])
def test_other_data_configs_compose(name):
    cfg = data_tool_cfg([f"data={name}", "data.root=/somewhere"])
    node = cfg.data.datamodule
    assert node._target_ == "detkit.data.DetectionDataModule"
    assert "/somewhere" in str(node.train.get("root", node.train.get("image_dir")))


@pytest.mark.parametrize(
    ("overrides", "size"),
    [
        ([], 256),  # the default model, yolo_digits, at the digits' 256 px
        (["model=yolov3"], 416),
        (["model=yolov1"], 448),
        (["model=yolov3", "model.image_size=608"], 608),
        (["model=yolov3", "model.image_size=[320,480]"], (320, 480)),
    ],
)
def test_anchors_are_fitted_at_the_models_input_size(coco_dir, capsys, overrides, size):
    image_dir, ann, _ = coco_dir  # images of 110x150 and 160x120: each axis scales on its own
    data = ["data=coco", f"data.train_images={image_dir}", f"data.train_ann={ann}"]
    run(data_tool_cfg(["action=anchors", "k=4", *data, *overrides]))
    header, printed = capsys.readouterr().out.strip().splitlines()
    expected = fit_anchors_from_dataset(COCODetection(image_dir, ann), 4, size)
    assert header.endswith(f"input size {size}:")
    assert ast.literal_eval(printed) == np.asarray(expected).round(1).tolist()


def test_anchors_refuse_a_model_without_an_input_size(coco_dir):
    image_dir, ann, _ = coco_dir
    data = ["data=coco", f"data.train_images={image_dir}", f"data.train_ann={ann}"]
    with pytest.raises(ValueError, match="model.image_size must be a positive int or"):
        run(data_tool_cfg(["action=anchors", *data, "model.image_size=0"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["action=anchors", "k=0"], "k must be a positive integer, got 0"),
        (["action=anchors", "k=-1"], "k must be a positive integer, got -1"),
        (["action=anchors", "k=abc"], "k must be a positive integer, got 'abc'"),
        (["action=browse", "n=0"], "n must be a positive integer, got 0"),
        (["action=browse", "n=-2"], "n must be a positive integer, got -2"),
        (["action=browse", "columns=0"], "columns must be a positive integer, got 0"),
    ],
)
def test_bad_counts_are_named_in_one_line(tmp_path, capsys, overrides, message):
    from detkit import cli

    args = [*overrides, f"data.root={tmp_path / 'none'}", f"hydra.run.dir={tmp_path}"]
    assert cli.main(["data", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
