"""Small detectors of each family from the project's configs (random weights), with score
thresholds set so that one test image has no detection and the others have a few."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from detkit.config import compose_config
from detkit.export.verify import sample_images
from detkit.testing import calibrate_random_weights, save_detector_checkpoint

SIZE = (256, 256)


def compose_train_config(model: str, overrides: tuple[str, ...] = ()):
    """``configs/train.yaml`` with ``model=<model>`` (no Hydra run: paths are not resolved)."""
    return compose_config("train", [f"model={model}", *overrides])


def build_model(model: str, overrides: tuple[str, ...] = ()):
    torch.manual_seed(0)
    cfg = compose_train_config(model, overrides)
    return instantiate(cfg.model).eval(), cfg


def set_score_threshold(model, value: float) -> None:
    """The final selection's score threshold (the RoI heads' for Faster R-CNN)."""
    getattr(model, "roi_heads", model).score_threshold = value


def calibrate(model) -> None:
    """:func:`detkit.testing.calibrate_random_weights` on sample images of the test size."""
    batches = [sample_images(4, SIZE, seed=50 + seed) for seed in range(3)]
    calibrate_random_weights(model, batches)


def make_batches(model) -> dict[str, torch.Tensor]:
    """``{"empty": [1, ...] (a constant image with no detection), "mixed": [3, ...] (the
    empty image and two different images), "single": [1, ...]}``; sets the threshold so the
    non-empty images keep a few (>= 5, < max) detections."""
    images = sample_images(3, SIZE, seed=7)
    constants = torch.stack([torch.full((3, *SIZE), v) for v in (0.0, 0.5, 1.0)])
    set_score_threshold(model, 0.0)
    with torch.no_grad():
        found = model(torch.cat([constants, images])).detections
    tops = [float(d["scores"].max()) for d in found]
    empty = min(range(3), key=lambda i: tops[i])
    # Midway between the 5th and 6th best score of the image that has the lowest 5th best:
    # that image keeps 5 detections, fewer than any top-k.
    ranked = [d["scores"].sort(descending=True).values for d in found[3:]]
    lowest = min(range(3), key=lambda i: float(ranked[i][4]))
    threshold = float(ranked[lowest][4] + ranked[lowest][5]) / 2
    assert tops[empty] < threshold, f"no empty image at threshold {threshold}: tops {tops}"
    set_score_threshold(model, threshold)
    others = [i for i in range(3) if i != lowest]
    return {
        "empty": constants[empty : empty + 1],
        "mixed": torch.stack([constants[empty], images[lowest], images[others[0]]]),
        "single": images[others[1] : others[1] + 1],
    }


def tiny_checkpoint(path: Path, model_name: str) -> Path:
    """A Lightning-style checkpoint ``{"state_dict": {"model." + k: v}, "detkit_config"}``."""
    model, cfg = build_model(model_name)
    return save_detector_checkpoint(path, model, cfg)


@pytest.fixture(scope="session")
def helpers():
    """The module's helpers, for tests in this directory."""
    import sys

    return sys.modules[__name__]
