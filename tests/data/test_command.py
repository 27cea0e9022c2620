"""``detkit data`` actions through the real configs (Hydra compose)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hydra.utils import instantiate
from PIL import Image

from detkit.config import compose_config
from detkit.data import DetectionDataModule
from detkit.data.command import run


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
    assert Image.open(grid).size == (2 * 300, 2 * 300)  # after the ssd train transforms
    run(data_tool_cfg(["action=browse", "n=4", "columns=2", "raw=true", f"file={grid}",
                       *small(out)]))  # fmt: skip
    assert Image.open(grid).size == (2 * 96, 2 * 96)
    run(data_tool_cfg(["action=stats", "split=val", *small(out)]))
    printed = capsys.readouterr().out
    assert "3 images" in printed and "boxes per class" in printed
    run(data_tool_cfg(["action=anchors", "k=3", "model.image_size=192", *small(out)]))
    anchors = ast.literal_eval(capsys.readouterr().out.strip())  # a list of [w, h]
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
