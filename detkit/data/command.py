"""``detkit data digits|browse|stats|anchors``: build, look at and summarise datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from detkit.data.datasets.digits import build_digits
from detkit.data.inspect import browse_grid, dataset_stats, print_stats
from detkit.data.splits import build_split
from detkit.options import positive_int

ACTIONS = ("digits", "browse", "stats", "anchors")


def run(cfg: DictConfig) -> None:
    """Dispatch ``cfg.action``."""
    action = cfg.get("action")
    if action == "digits":
        paths = build_digits(cfg.out, int(cfg.n_train), int(cfg.n_val), int(cfg.seed),
                             int(cfg.image_size))  # fmt: skip
        print(f"digits dataset ready in {paths['root']}")
        for split in ("train", "val"):
            print(
                f"  {split}: images {paths[f'{split}_images']}  COCO json {paths[f'{split}_ann']}"
            )
    elif action == "browse":
        raw = bool(cfg.get("raw", False))
        n, columns = positive_int(cfg.get("n"), "n"), positive_int(cfg.get("columns"), "columns")
        dataset = build_split(cfg, cfg.get("split", "train"), None if raw else "split")
        out = _browse_file(cfg)
        browse_grid(dataset, n=n, columns=columns, path=out, seed=int(cfg.get("seed", 0)))
        print(f"wrote {out}")
    elif action == "stats":
        dataset = build_split(cfg, cfg.get("split", "train"), None)
        print_stats(dataset_stats(dataset), dataset.class_names)
    elif action == "anchors":
        from detkit.matching import fit_anchors_from_dataset  # lazy: only this action needs it

        k = positive_int(cfg.get("k"), "k")
        size = model_input_size(cfg)
        dataset = build_split(cfg, cfg.get("split", "train"), None)
        anchors = fit_anchors_from_dataset(dataset, k, size)
        print(f"{k} anchors [w, h] in pixels at the model's input size {size}:")
        print(np.asarray(anchors).round(1).tolist())
    else:
        raise ValueError(f"unknown data action {action!r}; choose one of {list(ACTIONS)}")


def model_input_size(cfg: DictConfig) -> int | tuple[int, int]:
    """``cfg.model.image_size`` as :func:`fit_anchors_from_dataset` takes it: the side of a
    square input, or ``(h, w)``."""
    size = cfg.model.get("image_size") if cfg.get("model") is not None else None
    if isinstance(size, ListConfig):
        size = OmegaConf.to_container(size, resolve=True)
    if type(size) is int and size > 0:
        return size
    if isinstance(size, list) and len(size) == 2 and all(type(s) is int and s > 0 for s in size):
        return (size[0], size[1])
    raise ValueError(f"model.image_size must be a positive int or [h, w], got {size!r}")


def _browse_file(cfg: DictConfig) -> Path:
    if cfg.get("file"):
        return Path(cfg.file)
    try:
        base = Path(cfg.paths.output_dir)
    except Exception:  # no Hydra run (e.g. compose API): write beside the caller
        base = Path.cwd()
    return base / f"browse_{cfg.get('split', 'train')}.png"
