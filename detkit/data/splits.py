"""One split of a composed config's dataset, built for what the caller does with it."""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf

from detkit.config import safe_instantiate
from detkit.errors import UserError

SPLITS = ("train", "val", "test")
TRANSFORMS = ("eval", "split", None)


def build_split(config: DictConfig, split: str, transforms: str | None = "eval"):
    """The dataset of ``split`` (``config.data.datamodule.<split>``).

    ``transforms``: ``"eval"`` puts the config's deterministic ``transforms.eval`` in place of
    the split's own (evaluation and prediction see plain resizes, whatever the split trains
    with); ``"split"`` keeps the split's own (to look at the training augmentation); ``None``
    loads the images as they are (statistics, anchor fitting).
    """
    if transforms not in TRANSFORMS:
        raise ValueError(f"transforms must be one of {TRANSFORMS}, got {transforms!r}")
    datamodule = config.data.datamodule
    if datamodule.get(split) is None:
        known = [k for k in SPLITS if datamodule.get(k) is not None]
        raise UserError(f"the data config has no {split!r} split; it has {known}")
    config = copy.deepcopy(config)  # the caller's config stays as it was
    node = config.data.datamodule[split]
    if "transforms" in node and transforms != "split":
        # Replaced before resolving: the split's own may name transforms the config does not
        # hold (an exported model's config has its eval transforms only).
        node.transforms = config.transforms.eval if transforms == "eval" else None
    return safe_instantiate(OmegaConf.to_container(node, resolve=True))
