"""Checkpoints hold the resolved config and the weights, never pickled modules."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.errors import UserError

MODEL_PREFIX = "model."


def read_checkpoint(path: str | Path) -> dict:
    """Load a detkit checkpoint safely (``weights_only=True``), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"checkpoint {path} could not be read: {err}") from err
    if not isinstance(checkpoint, dict) or "detkit_config" not in checkpoint:
        raise UserError(
            f"checkpoint {path} was not written by `detkit train` (it has no detkit_config)"
        )
    return checkpoint


def checkpoint_config(checkpoint: dict) -> DictConfig:
    """The run's resolved config stored in the checkpoint."""
    return OmegaConf.create(checkpoint["detkit_config"])


def load_detector(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, DictConfig]:
    """Rebuild the detector from the checkpoint alone; returns ``(model in eval mode, config)``."""
    checkpoint = read_checkpoint(path)
    config = checkpoint_config(checkpoint)
    model = instantiate(without_pretrained_weights(config.model))
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit its own model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.to(device).eval(), config


def without_pretrained_weights(model_cfg: DictConfig) -> dict:
    """The model config with its pretrained-weights options off.

    Rebuilding from a checkpoint must never download: the checkpoint has the weights. The
    options are the detector's ``pretrained`` and each backbone's ``weights`` (a box coder's
    ``weights`` are its scaling factors and stay).
    """

    def strip(node):
        if isinstance(node, list):
            return [strip(v) for v in node]
        if not isinstance(node, dict):
            return node
        node = {k: strip(v) for k, v in node.items()}
        if "backbone" in str(node.get("_target_", "")).lower():
            for key in ("weights", "weights_backbone"):
                if key in node:
                    node[key] = None
        return node

    resolved = strip(OmegaConf.to_container(model_cfg, resolve=True))
    if "pretrained" in resolved:
        resolved["pretrained"] = None
    return resolved
