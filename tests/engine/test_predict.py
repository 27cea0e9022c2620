"""``detkit predict``: its options, the images a source names, the drawings' names, and
detections that do not depend on the other images of a batch."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from detkit import cli
from detkit.config import compose_config
from detkit.engine.predict import drawing_names, find_images, predict_images
from detkit.testing import digits_batch, save_detector_checkpoint

SMALL = (100, 60)  # (h, w): portrait, so a landscape LARGE pads it wider in a batch
LARGE = (512, 1024)


def _checkpoint(path: Path, model_name: str) -> Path:
    """Random weights of ``model_name`` with its composed config, as a checkpoint holds them."""
    torch.manual_seed(0)
    cfg = compose_config("train", [f"model={model_name}", "data=digits"])
    return save_detector_checkpoint(path, instantiate(cfg.model).eval(), cfg)


def _write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A digits canvas resized to ``size`` (h, w), so a detector finds something on it."""
    images, _ = digits_batch(1, seed=seed)
    pixels = (images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).resize(size[::-1]).save(path)
    return path


# ----- options: one line naming the option -----------------------------------------------------
@pytest.mark.parametrize(
    "option, message",
    [
        ("score_threshold=abc", "score_threshold must be a number in [0, 1], got 'abc'"),
        ("score_threshold=1.5", "score_threshold must be a number in [0, 1], got 1.5"),
        ("score_threshold=-1", "score_threshold must be a number in [0, 1], got -1"),
        ("score_threshold=nan", "score_threshold must be a number in [0, 1], got nan"),
        ("max_images=abc", "max_images must be a positive integer or null, got 'abc'"),
        ("max_images=0", "max_images must be a positive integer or null, got 0"),
        ("max_images=-1", "max_images must be a positive integer or null, got -1"),
        ("batch_size=0", "batch_size must be a positive integer, got 0"),
        ("batch_size=abc", "batch_size must be a positive integer, got 'abc'"),
    ],
)
def test_predict_refuses_a_bad_option_in_one_line(tmp_path, capsys, option, message):
    # Checked before the checkpoint is read: a missing one is never reached.
    args = [f"ckpt={tmp_path / 'none.ckpt'}", f"source={tmp_path}", option]
    assert cli.main(["predict", *args, f"hydra.run.dir={tmp_path / 'run'}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"detkit: error: {message}"]
    assert not (tmp_path / "run" / "detections.json").exists()


# ----- the images a source names ----------------------------------------------------------------
def test_a_folder_source_reads_its_top_level_and_counts_the_images_below_it(tmp_path, caplog):
    for name in ("a.png", "nested/b.png", "nested/deeper/c.jpg", "other/d.png", "other/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="detkit"):
        assert find_images(tmp_path) == [tmp_path / "a.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "3 images in 2 sub-folders not read" in warnings[0]
    assert f"source='{tmp_path}/**/*'" in warnings[0]
    assert len(find_images(f"{tmp_path}/**/*")) == 4  # the glob the warning suggests


def test_a_folder_without_sub_folders_gives_no_warning(tmp_path, caplog):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="detkit"):
        assert find_images(tmp_path) == [tmp_path / "a.png"]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ----- drawings: one file per image -------------------------------------------------------------
def test_drawing_names_are_distinct_for_equal_stems():
    files = [Path("x/a.jpg"), Path("x/a.png"), Path("y/a.png"), Path("y/A.PNG"), Path("a_1.png")]
    names = drawing_names(files)
    assert names == ["a.png", "a_1.png", "a_2.png", "A_3.png", "a_1_1.png"]
    assert len({n.lower() for n in names}) == len(files)


def test_predict_draws_each_of_the_images_that_share_a_stem(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.ckpt", "ssd_digits")
    source = tmp_path / "images"
    for i, name in enumerate(("a.jpg", "a.png", "sub/a.png")):
        _write_image(source / name, (128, 128), seed=i)
    out = tmp_path / "out"
    written = predict_images(ckpt, f"{source}/**/*", out)
    drawn = [entry["drawn"] for entry in written]
    assert [Path(entry["file"]).relative_to(source).as_posix() for entry in written] == [
        "a.jpg",
        "a.png",
        "sub/a.png",
    ]
    assert len(set(drawn)) == 3 and all(Path(d).is_file() for d in drawn)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(Path(d).name for d in drawn)
    assert json.loads((out / "detections.json").read_text()) == written


# ----- detections do not depend on the batch ----------------------------------------------------
def _small_image_detections(ckpt, tmp_path, batch_size: int) -> list[dict]:
    """The small image's detections, predicted alone or in one batch with a larger image."""
    source = tmp_path / "images"
    if not source.exists():
        _write_image(source / "1_small.png", SMALL, seed=3)
        _write_image(source / "2_large.png", LARGE, seed=4)
    out = tmp_path / f"batch{batch_size}"
    written = predict_images(ckpt, source, out, score_threshold=0.0, batch_size=batch_size)
    assert Path(written[0]["file"]).name == "1_small.png"
    return written[0]["detections"]


@pytest.mark.parametrize("model_name", ["ssd_digits", "faster_rcnn_digits"])
def test_predictions_of_an_image_stay_inside_it_whatever_its_batch(model_name, tmp_path):
    ckpt = _checkpoint(tmp_path / "model.ckpt", model_name)
    alone = _small_image_detections(ckpt, tmp_path, batch_size=1)
    batched = _small_image_detections(ckpt, tmp_path, batch_size=2)
    assert alone and batched
    height, width = SMALL
    for det in alone + batched:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 <= x2 <= width + 1e-3 and 0 <= y1 <= y2 <= height + 1e-3, det
    if model_name == "ssd_digits":  # resized to a fixed size: no padding, the same detections
        boxes = [torch.tensor([d["box"] for d in dets]) for dets in (alone, batched)]
        torch.testing.assert_close(boxes[0], boxes[1], atol=1e-3, rtol=0)
        assert [d["label"] for d in alone] == [d["label"] for d in batched]
