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

Configs are data. Whatever detkit builds from a config goes through :func:`safe_instantiate`,
which admits only the ``_target_`` names of :mod:`detkit.allowlist` (detkit's building parts,
a few named Lightning/torch callables, and what ``DETKIT_ALLOWED_TARGETS`` adds). A config
read back from a file detkit wrote (a checkpoint, an ONNX sidecar) is opened with
:func:`config_from_file`: it was stored resolved, so interpolations in it are refused rather
than resolved.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detkit.allowlist import checked, refuse_interpolations
from detkit.errors import UserError

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


def written_where(value: str) -> str:
    """Where the running Hydra app's config got ``value``, for a refusal (Hydra's composition
    keeps no file per key): `` (from the command line: key=value)``, `` (in FILE)`` for the
    first of the user's config files holding it (``--config-dir``, ``./configs``,
    ``$DETKIT_CONFIG_PATH``; not detkit's own), or ``""`` if neither holds it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    hydra = HydraConfig.get()
    for override in hydra.overrides.task:
        if value in override:
            return f" (from the command line: {override})"
    packaged = CONFIG_DIR.resolve()
    for source in hydra.runtime.config_sources:
        folder = Path(source.path)
        if source.schema != "file" or not folder.is_dir() or folder.resolve() == packaged:
            continue
        for path in _yaml_files(folder):
            try:
                if value in path.read_text(encoding="utf-8", errors="replace"):
                    return f" (in {path})"
            except OSError:
                continue
    return ""


def _yaml_files(folder: Path, limit: int = 2000):
    """The ``.yaml`` files under ``folder``, sorted per directory, at most ``limit`` entries
    looked at (a config dir given as ``.`` or ``/`` must not walk the whole disk)."""
    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            seen += 1
            if seen > limit:
                return
            if name.endswith(".yaml"):
                yield Path(root) / name
        seen += len(dirs)


def compose_config(config_name: str = "train", overrides: list[str] | tuple = ()) -> DictConfig:
    """The composed config of a command (``train``, ``eval``, ...) without a Hydra run, as
    tests, benchmarks and notebooks want it (``${hydra:...}`` paths stay unresolved)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=[*search_path_overrides(), *overrides])


LEFT_AFTER_RESOLVING = "it is left after resolving, and building would resolve it once more"


def safe_instantiate(node, source: str | None = None, **kwargs):
    """Hydra's ``instantiate(node, **kwargs)`` for a config that only names allowed targets.

    ``node`` is resolved first (as Hydra would), then every ``_target_`` in it is checked
    and replaced by the callable it names, so what was checked is what runs. A refusal is a
    :class:`~detkit.errors.UserError` naming ``source`` (default: the config key of ``node``)
    and the target. ``kwargs`` come from the calling code and are passed as they are.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not OmegaConf.is_config(node):
        node = OmegaConf.create(node, flags={"allow_objects": True})
    where = node._get_full_key(None) if node._get_parent() is not None else ""
    source = source or "the config"
    resolved = OmegaConf.to_container(node, resolve=True)
    # Hydra resolves once more what it is given: a "${" left after resolving (an escaped one,
    # or one a resolver returned) would be evaluated on that second pass.
    refuse_interpolations(resolved, source, where, why=LEFT_AFTER_RESOLVING)
    try:
        return instantiate(checked(resolved, source, where), **kwargs)
    except InstantiationException as err:
        # Hydra wraps a part's own one-line error (a missing file, an unknown class name) in
        # its own message and traceback; the user is shown the part's line.
        cause = err.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, (ValueError, FileNotFoundError)):
            raise cause from None
        if isinstance(cause, TypeError):
            # a config's wrong key or value type (an unexpected argument, a string for a
            # number): Hydra's message names the target and the key, on one line here
            raise UserError(f"{source}: {' '.join(str(err).split())}") from None
        raise


def config_from_file(config, source: str) -> DictConfig:
    """The stored config of a checkpoint or sidecar as a DictConfig, after refusing
    interpolations and targets outside the allow-list (``source`` names the file)."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: its config is a {type(config).__name__}, not a mapping")
    refuse_interpolations(config, source)
    checked(config, source)
    try:
        return OmegaConf.create(config)
    except Exception as err:  # OmegaConf's errors for keys or values a config cannot hold
        raise UserError(f"{source}: its config cannot be read: {err}".splitlines()[0]) from err
