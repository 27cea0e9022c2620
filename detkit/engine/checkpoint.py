"""Checkpoints hold the resolved config and the weights, never pickled modules."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from detkit.config import config_from_file, safe_instantiate
from detkit.errors import UserError

MODEL_PREFIX = "model."


def read_checkpoint(path: str | Path) -> dict:
    """Load a detkit checkpoint safely, with clear errors: ``weights_only=True``, and a config
    that names only allowed targets and holds no interpolations (:func:`config_from_file`)."""
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
    config_from_file(checkpoint["detkit_config"], f"checkpoint {path}")
    return checkpoint


def check_resume_checkpoint(path: str | Path | None) -> None:
    """Refuse, in one line, a Lightning checkpoint given to ``ckpt_path=`` that does not load
    with ``weights_only=True`` (the loader ``detkit train`` resumes with): it holds pickled
    objects, which would run code when unpickled. Nothing in it is executed here.

    Lightning's own names (``last``, ``best``...) and missing files are left to Lightning.
    """
    if path is None or not Path(path).is_file():
        return
    try:
        # mmap: the tensors' bytes are not read, only the pickled structure is checked.
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        named = f" ({found.group(1)})" if found else ""
        raise UserError(
            f"checkpoint {path} holds objects outside torch's safe types{named}, so it was not "
            "written by `detkit train`; resuming loads with weights_only=True only (load it "
            "yourself with weights_only=False only if you trust where it came from)"
        ) from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"checkpoint {path} could not be read: {reason}") from None


def checkpoint_config(checkpoint: dict) -> DictConfig:
    """The run's resolved config stored in the checkpoint."""
    return OmegaConf.create(checkpoint["detkit_config"])


def load_detector(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, DictConfig]:
    """Rebuild the detector from the checkpoint alone; returns ``(model in eval mode, config)``."""
    checkpoint = read_checkpoint(path)
    config = checkpoint_config(checkpoint)
    model = safe_instantiate(without_pretrained_weights(config.model), f"checkpoint {path}")
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
