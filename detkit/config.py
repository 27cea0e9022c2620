"""Where detkit's Hydra configs live and how they are composed.

The configs ship inside the package (``detkit/configs``), so an installed wheel runs
``detkit train`` like the checkout does. Users add their own experiments, datasets or models
without touching the package, in folders that mirror the packaged layout (``experiment/``,
``data/``, ``model/``, ...):

- ``--config-dir DIR`` on the command line (Hydra's own flag), e.g.
  ``detkit train --config-dir ./my_configs experiment=mine``;
- a ``configs/`` folder in the working directory, and the folders listed in the
  ``DETKIT_CONFIG_PATH`` environment variable (``os.pathsep``-separated).

They are searched after the packaged configs (Hydra's rule), so they add new names: to
change a packaged config, copy it under a new name, or override its keys.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# A folder of this name in the working directory is added to the config search path.
LOCAL_CONFIG_DIR = "configs"
CONFIG_PATH_ENV = "DETKIT_CONFIG_PATH"


def user_config_dirs(cwd: str | os.PathLike | None = None) -> list[Path]:
    """The user's config folders that exist: ``$DETKIT_CONFIG_PATH`` entries, then
    ``./configs`` (searched in that order, after the packaged configs)."""
    dirs = [Path(p) for p in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(cwd or Path.cwd()) / LOCAL_CONFIG_DIR)
    # The packaged folder itself (a run from inside detkit/) is already on the path.
    return [d.resolve() for d in dirs if d.is_dir() and d.resolve() != CONFIG_DIR]


def search_path_overrides(cwd: str | os.PathLike | None = None) -> list[str]:
    """A Hydra override putting :func:`user_config_dirs` on the search path (none if empty)."""
    dirs = user_config_dirs(cwd)
    if not dirs:
        return []
    entries = ",".join(f"'file://{d.as_posix()}'" for d in dirs)
    return [f"hydra.searchpath=[{entries}]"]


def compose_config(config_name: str = "train", overrides: list[str] | tuple = ()) -> DictConfig:
    """The composed config of a command (``train``, ``eval``, ...) without a Hydra run, as
    tests, benchmarks and notebooks want it (``${hydra:...}`` paths stay unresolved)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=[*search_path_overrides(), *overrides])
