"""Which data a checkpoint is evaluated on, and how its labels meet the dataset's.

``detkit eval ckpt=... data=<dataset>`` evaluates on another dataset than the one the model
was trained on: the given data config replaces the checkpoint's (a merge would mix keys of two
dataset classes), and the dataset's classes must be the model's.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from detkit.errors import UserError


def replace_data(config: DictConfig, data: dict, paths: dict | None = None) -> DictConfig:
    """The checkpoint's ``config`` with ``data`` (an unresolved ``data`` group node) in place
    of the data it was trained on.

    ``data``'s interpolations resolve against the checkpoint's ``transforms`` and ``model``
    (``${transforms.eval}``, ``${model.image_size}``) and against ``paths``, the current run's
    resolved paths (``${paths.cache_dir}``), when given.
    """
    merged = OmegaConf.to_container(config, resolve=False)
    merged["data"] = data
    if paths is not None:
        merged["paths"] = paths
    return OmegaConf.create(merged)


def model_class_names(config: DictConfig) -> list[str] | None:
    """The class names a checkpoint's model was trained with (None if the run read them from
    its annotation file and did not record them)."""
    data = config.get("data") or {}
    names = data.get("class_names")
    return [str(n) for n in names] if names else None


def label_map(num_classes: int, names: list[str] | None, dataset, ckpt: object) -> list[int] | None:
    """For each model label, the dataset label of the same class; None when they are equal.

    Classes are matched by name when the checkpoint knows its names (the same names in
    another order are re-mapped), by count otherwise. Anything else is a UserError naming
    both sides.
    """
    theirs = [str(n) for n in dataset.class_names]
    where = getattr(dataset, "source", type(dataset).__name__)
    if names is None:
        if len(theirs) == num_classes:
            return None
    elif names == theirs:
        return None
    elif len(set(names)) == len(names) and sorted(names) == sorted(theirs):
        return [theirs.index(name) for name in names]
    ours = f"{names}" if names is not None else "(names not recorded)"
    raise UserError(
        f"checkpoint {ckpt} predicts {num_classes} classes {_short(ours)} but {where} has "
        f"{len(theirs)} classes {_short(str(theirs))}: evaluate on data with the model's classes"
    )


def relabel(pairs: list[tuple[dict, dict]], mapping: list[int] | None) -> list[tuple[dict, dict]]:
    """``(target, detections)`` pairs with detection labels sent through ``mapping``."""
    if mapping is None:
        return pairs
    table = torch.as_tensor(mapping, dtype=torch.int64)
    return [(target, {**det, "labels": table[det["labels"]]}) for target, det in pairs]


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 4] + " ...]"
