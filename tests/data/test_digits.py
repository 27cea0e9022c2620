"""The built-in digits set: real MNIST ink, deterministic, disjoint splits, idempotent build."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detkit.data import DigitsDetection, build_digits
from detkit.data.datasets.digits import load_mnist_5k, split_indices


def test_mnist_sample_layout_and_disjoint_balanced_pools():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    train, val = split_indices(labels, "train"), split_indices(labels, "val")
    assert not set(train) & set(val) and len(train) == 4000 and len(val) == 1000
    assert np.bincount(labels[val]).tolist() == [100] * 10


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return root, build_digits(root, n_train=12, n_val=6, seed=3, image_size=128)


def test_build_is_deterministic_and_idempotent(built, tmp_path):
    root, paths = built
    again = build_digits(tmp_path, n_train=12, n_val=6, seed=3, image_size=128)
    for split in ("train", "val"):
        assert json.loads(paths[f"{split}_ann"].read_text()) == json.loads(
            again[f"{split}_ann"].read_text()
        )
        a = np.asarray(Image.open(paths[f"{split}_images"] / "000003.png"))
        b = np.asarray(Image.open(again[f"{split}_images"] / "000003.png"))
        assert (a == b).all()
    stamp = paths["train_ann"].stat().st_mtime_ns
    build_digits(root, n_train=12, n_val=6, seed=3, image_size=128)
    assert paths["train_ann"].stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = build_digits(tmp_path / "other", n_train=12, n_val=6, seed=4, image_size=128)
    assert other["train_ann"].read_text() != paths["train_ann"].read_text()


def test_digits_items_and_boxes_hold_ink(built):
    root, _ = built
    ds = DigitsDetection(root, "train", n_train=12, n_val=6, seed=3, image_size=128)
    assert len(ds) == 12 and ds.class_names == [str(d) for d in range(10)]
    assert ds.label_to_category_id == list(range(1, 11))
    counts = []
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 128, 128)
        counts.append(len(target["boxes"]))
        for x1, y1, x2, y2 in target["boxes"].round().long().tolist():
            assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
            # a tight ink box: its pixels vary (ink vs background) more than a flat patch
            assert image[:, y1:y2, x1:x2].std() > 0.03
    assert min(counts) >= 1 and max(counts) <= 6 and sum(counts) > 12
    assert all(0 <= int(v) <= 9 for v in target["labels"])
    with pytest.raises(ValueError, match="split"):
        DigitsDetection(root, "test", n_train=12, n_val=6, seed=3, image_size=128)


def test_a_dataset_config_never_rebuilds_a_set_built_with_other_parameters(tmp_path):
    root = tmp_path / "mine"
    paths = build_digits(root, n_train=4, n_val=2, seed=1, image_size=64)
    before = paths["train_ann"].read_text()
    with pytest.raises(
        ValueError, match=r"holds a digits set built with n_train=4 \(this config: 8\)"
    ):
        DigitsDetection(root, "train", n_train=8, n_val=2, seed=1, image_size=64)
    assert paths["train_ann"].read_text() == before  # untouched
    assert len(DigitsDetection(root, "train", n_train=4, n_val=2, seed=1, image_size=64)) == 4
    # `detkit data digits` asks for the set it names: that replaces it
    build_digits(root, n_train=8, n_val=2, seed=1, image_size=64)
    assert len(json.loads(paths["train_ann"].read_text())["images"]) == 8
