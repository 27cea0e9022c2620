"""Small detectors of each family from the project's configs (random weights), with score
thresholds set so that one test image has no detection and the others have a few."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detkit.config import compose_config
from detkit.export.verify import sample_images

SIZE = (256, 256)


def compose_train_config(model: str, overrides: tuple[str, ...] = ()):
    """``configs/train.yaml`` with ``model=<model>`` (no Hydra run: paths are not resolved)."""
    return compose_config("train", [f"model={model}", *overrides])


def build_model(model: str):
    torch.manual_seed(0)
    cfg = compose_train_config(model)
    return instantiate(cfg.model).eval(), cfg


def set_score_threshold(model, value: float) -> None:
    """The final selection's score threshold (the RoI heads' for Faster R-CNN)."""
    getattr(model, "roi_heads", model).score_threshold = value


def calibrate(model) -> None:
    """Make random weights behave like trained ones: BatchNorm statistics measured on sample
    images (with the initial ones, deep activations vanish and every location predicts the
    same, exactly tied, scores) and YOLO predictors without their prior bias (class logits
    of spread ~1, so scores spread over (0, 1); boxes near their priors or, anchor-free,
    distance distributions near uniform)."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in range(3):
            features = model.backbone(model.normalize(sample_images(4, SIZE, seed=50 + seed)))
            if hasattr(model, "neck"):
                model.neck(features)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    if hasattr(model.head, "class_branches"):  # anchor-free YOLO: class and box predictors
        # Distance distributions leaning to the first bins (sides of ~1.5 strides, as a
        # trained model's small digits), so NMS keeps neighbouring boxes apart.
        bins = torch.arange(model.head.reg_max, dtype=torch.float32)
        for branch, spread, bias in (
            (model.head.class_branches, 0.3, torch.zeros(model.num_classes)),
            (model.head.box_branches, 0.05, (-0.5 * bins).repeat(4)),
        ):
            for conv in (layers[-1] for layers in branch):
                weight = torch.randn(conv.weight.shape, generator=gen)
                conv.weight.data.copy_(weight * spread / conv.weight[0].numel() ** 0.5)
                conv.bias.data.copy_(bias)
    elif model.family == "yolo":
        for conv in model.head.predictors:
            # Box offsets small (a trained model's boxes stay near their anchors), class and
            # objectness logits of spread ~1.
            columns = torch.full((model.head.num_columns, 1, 1, 1), 0.3)
            columns[:4] = 0.01
            weight = torch.randn(conv.weight.shape, generator=gen) / conv.weight[0].numel() ** 0.5
            conv.weight.data.copy_(
                weight * columns.repeat(conv.weight.shape[0] // len(columns), 1, 1, 1)
            )
            conv.bias.data.zero_()


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
    config = OmegaConf.to_container(cfg, resolve=False)
    config["paths"] = {"cache_dir": str(path.parent), "output_dir": str(path.parent)}
    config = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "detkit_config": config}, path)
    return path


@pytest.fixture(scope="session")
def helpers():
    """The module's helpers, for tests in this directory."""
    import sys

    return sys.modules[__name__]
