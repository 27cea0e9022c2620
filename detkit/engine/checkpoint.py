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


def _load_weights_only(path: Path, mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)`` with one-line errors naming the file.

    A file holding other pickled objects is refused without torch's advice to load it with
    ``weights_only=False``: that would run whatever the file names.
    """
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        named = f" ({found.group(1)})" if found else ""
        raise UserError(
            f"checkpoint {path} holds objects outside torch's safe types{named}, so it was not "
            "written by `detkit train`; detkit loads checkpoints with weights_only=True only "
            "(load it yourself with weights_only=False only if you trust where it came from)"
        ) from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        if isinstance(err, EOFError):
            reason = "the file is empty or cut short"
        raise UserError(f"checkpoint {path} could not be read: {reason}") from None


def read_checkpoint(path: str | Path) -> dict:
    """Load a detkit checkpoint safely, with clear errors: ``weights_only=True``, and a config
    that names only allowed targets and holds no interpolations (:func:`config_from_file`),
    with the parts a detector is rebuilt from (a ``model`` section, a ``state_dict``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = _load_weights_only(path)
    if not isinstance(checkpoint, dict) or "detkit_config" not in checkpoint:
        raise UserError(
            f"checkpoint {path} was not written by `detkit train` (it has no detkit_config)"
        )
    config = config_from_file(checkpoint["detkit_config"], f"checkpoint {path}")
    require_sections(config, f"checkpoint {path}", "model")
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"checkpoint {path} has no state_dict (the weights)")
    return checkpoint


def require_sections(config: DictConfig, source: str, *sections: str) -> None:
    """Refuse, in one line, a stored config without the sections a command reads (`detkit
    train` writes them all: ``model``, ``transforms``, ``data`` ...)."""
    for section in sections:
        if not isinstance(config.get(section), DictConfig):
            raise UserError(f"{source}: its config has no {section} section")


def check_resume_checkpoint(path: str | Path | None) -> None:
    """Refuse, in one line, a Lightning checkpoint given to ``ckpt_path=`` that does not load
    with ``weights_only=True`` (the loader ``detkit train`` resumes with): it holds pickled
    objects, which would run code when unpickled. Nothing in it is executed here.

    Lightning's own names (``last``, ``best``...) and missing files are left to Lightning.
    """
    _resume_checkpoint(path)


def _resume_checkpoint(path: str | Path | None) -> dict | None:
    """The checkpoint ``ckpt_path`` names, loaded as :func:`check_resume_checkpoint` checks
    it (None for Lightning's own names and missing files), which must be one `detkit train`
    wrote: a Lightning checkpoint with detkit's config and a state_dict."""
    if path is None or not Path(path).exists():
        return None
    # mmap: the tensors' bytes are not read, only the pickled structure is checked.
    path = Path(path)
    checkpoint = _load_weights_only(path, mmap=path.is_file() and zipfile.is_zipfile(path))
    parts = ("detkit_config", "state_dict", "pytorch-lightning_version")
    if not isinstance(checkpoint, dict) or any(part not in checkpoint for part in parts):
        raise UserError(
            f"checkpoint {path} was not written by `detkit train` (a Lightning checkpoint with "
            "detkit_config and state_dict), so it cannot be resumed"
        )
    if not isinstance(checkpoint["state_dict"], dict):
        raise UserError(f"checkpoint {path} has no state_dict (the weights)")
    if not isinstance(checkpoint["detkit_config"], dict):
        kind = type(checkpoint["detkit_config"]).__name__
        raise UserError(f"checkpoint {path}: its detkit_config is a {kind}, not a mapping")
    return checkpoint


def check_resume_fits(path: str | Path | None, module: nn.Module) -> None:
    """Refuse, in one line, resuming ``module`` (the run's LightningModule) from a checkpoint
    of another model: Lightning would fail on its first missing key with the whole list."""
    checkpoint = _resume_checkpoint(path)
    if checkpoint is None:
        return
    theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if hasattr(v, "shape")}
    ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    resized = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
    if missing or unexpected or resized:
        trained = (checkpoint["detkit_config"].get("model") or {}).get("_target_", "model")
        shown = [
            f"{len(missing)} missing",
            f"{len(unexpected)} unexpected",
            f"{len(resized)} resized",
        ]
        first = (missing or unexpected or resized)[0]
        raise UserError(
            f"checkpoint {path} does not fit this run's model ({', '.join(shown)} weights, "
            f"e.g. {first}): it holds a {trained}; resume with the config it was trained with"
        )


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
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that differ: one line, not torch's list of them
        found = re.search(
            r"size mismatch for ([\w.]+): .*?shape (torch.Size\(\[[\d, ]*\]\)).*?"
            r"shape in current model is (torch.Size\(\[[\d, ]*\]\))",
            str(err),
        )
        detail = (
            f": {found.group(1)} is {found.group(2)}, the config builds {found.group(3)}"
            if found
            else ""
        )
        raise UserError(f"checkpoint {path} does not fit its own model config{detail}") from None
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
