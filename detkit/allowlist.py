"""What a config may build: the allow-list of Hydra ``_target_`` names.

Hydra's ``_target_`` is a function call, so a config is code unless its targets are checked.
A checkpoint, an ONNX sidecar or a YAML file from elsewhere is data: every ``_target_`` in it
(nested anywhere, in ``_args_`` lists, in lists of transforms) must name one of

- detkit's building parts: a public class defined in :data:`PART_PACKAGES` (models, matching,
  datasets, the datamodule, transforms), under any of its import paths there
  (``detkit.models.SSD`` and ``detkit.models.detectors.ssd.SSD`` are the same class), or a
  public function of :data:`BUILDER_MODULES` (transform pipelines, learning-rate schedules),
  which build a part and do nothing else. Not "anything under ``detkit.``": the file writers,
  the commands and the exporters (``detkit.files``, ``detkit.data.build_digits``,
  ``detkit.engine.run``, ``detkit.cli`` ...) are refused;
- the third-party callables of :data:`THIRD_PARTY`, by these exact names;
- names the user allowed in the environment variable ``DETKIT_ALLOWED_TARGETS``
  (comma-separated; ``name`` exactly, or ``prefix.*`` for everything under a package), e.g.
  ``DETKIT_ALLOWED_TARGETS=mypkg.MyBackbone,otherpkg.*`` for one's own backbone class. The
  opt-in comes from the environment, never from the file being loaded.

A name is judged by its text before anything is imported: it must be a plain dotted name,
and a detkit one must have the form ``<module>.<Name>`` with the module inside the part
packages (or :data:`REEXPORTS`), so only detkit's own modules, the named third-party ones and
the user's are ever imported. After the import, a detkit name must turn out to be a class or
builder function defined there: ``detkit.data.datasets.digits.os.system`` (an imported
module's function) or ``detkit.models.SSD.from_torchvision`` (a method) are refused.
:func:`checked` hands on the located callables themselves, so what was checked is what runs.

Note that parts may read or fetch what their config names, as they do in training: a dataset
reads its annotation files, :class:`~detkit.data.DigitsDetection` builds the digits set into
its ``root``, a backbone with ``weights`` set downloads torchvision's weights (rebuilding
from a checkpoint turns those off).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable

from detkit.errors import UserError

ALLOWED_TARGETS_ENV = "DETKIT_ALLOWED_TARGETS"

# Packages (or modules) whose public classes are building parts.
PART_PACKAGES = (
    "detkit.models",
    "detkit.matching",
    "detkit.data.datasets",
    "detkit.data.datamodule",
    "detkit.data.transforms",
    "detkit.data.ssd_augment",
    "detkit.engine.callbacks",  # the training run's own callbacks (checkpoints, resume state)
)
# Modules whose public functions build a part and have no other effect.
BUILDER_MODULES = (
    "detkit.data.transforms",
    "detkit.engine.schedules",
    "detkit.models.detectors.yolo",
)
# Packages that re-export parts under shorter names (detkit.data.COCODetection).
REEXPORTS = ("detkit.data",)

# Third-party callables, by exact name: what the packaged configs use, plus a few
# side-effect-free optimizers and the common Lightning callbacks and file loggers.
_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "NAdam", "RAdam", "Adagrad")
_CALLBACKS = (
    "ModelCheckpoint",
    "RichProgressBar",
    "TQDMProgressBar",
    "LearningRateMonitor",
    "EMAWeightAveraging",
    "EarlyStopping",
    "StochasticWeightAveraging",
    "ModelSummary",
    "RichModelSummary",
    "Timer",
)
THIRD_PARTY = frozenset(
    [
        "lightning.Trainer",
        "lightning.pytorch.Trainer",
        *(f"torch.optim.{name}" for name in _OPTIMIZERS),
        *(f"lightning.pytorch.callbacks.{name}" for name in _CALLBACKS),
        "lightning.pytorch.loggers.CSVLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
    ]
)

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_OPT_IN_HINT = f"to allow your own code, set {ALLOWED_TARGETS_ENV}=name,package.*"


class RefusedTarget(UserError):
    """A ``_target_`` outside the allow-list (or not a name at all); ``target`` is the refused
    value when the refusal names one."""

    target: object = None


def user_allowed(name: str) -> bool:
    """Whether ``$DETKIT_ALLOWED_TARGETS`` allows ``name`` (read at each call)."""
    for entry in os.environ.get(ALLOWED_TARGETS_ENV, "").split(","):
        entry = entry.strip()
        if entry.endswith(".*") and name.startswith(entry[:-1]):
            return True
        if entry and name == entry:
            return True
    return False


def _inside(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def allowed_target(name: object) -> Callable:
    """The callable ``name`` stands for, if the allow-list admits it; else :class:`RefusedTarget`
    with the reason (the caller adds where the name came from)."""
    if not isinstance(name, str) or not _DOTTED.fullmatch(name):
        raise RefusedTarget("it is not a plain dotted name")
    if name in THIRD_PARTY or user_allowed(name):
        return _locate(name)
    module, _, attr = name.rpartition(".")
    if not (module in REEXPORTS or _inside(module, PART_PACKAGES + BUILDER_MODULES)):
        raise RefusedTarget(f"it is not on detkit's allow-list ({_OPT_IN_HINT})")
    # Only detkit's own modules get here: importing them runs nothing the file chose.
    found = _import(module)
    if found is None or not hasattr(found, attr):
        raise RefusedTarget(f"detkit has no {name} (a detkit target is <module>.<Name>)")
    target = getattr(found, attr)
    defined_in = getattr(target, "__module__", None) or ""
    own_name = getattr(target, "__qualname__", None) == attr and not attr.startswith("_")
    if own_name and inspect.isclass(target) and _inside(defined_in, PART_PACKAGES):
        return target
    if own_name and inspect.isfunction(target) and defined_in in BUILDER_MODULES:
        return target
    raise RefusedTarget(f"it is not one of detkit's building parts ({_OPT_IN_HINT})")


def _import(module_name: str):
    """The module ``module_name``, or None if no such module exists (a module that exists but
    fails to import raises)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name + ".").startswith(err.name + "."):
            return None
        raise


def _locate(name: str) -> object:
    """What ``name`` names, as Hydra finds it: the longest importable module prefix, then
    attributes (``mypkg.Model.from_config``)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        found = _import(".".join(parts[:cut]))
        if found is None:
            continue
        for attr in parts[cut:]:
            if not hasattr(found, attr):
                raise RefusedTarget(f"{'.'.join(parts[:cut])} has no {attr!r}")
            found = getattr(found, attr)
        return found
    raise RefusedTarget(f"no module {parts[0]!r} is installed")


def checked(node, source: str, where: str = ""):
    """A copy of the plain config ``node`` (dicts, lists, values) with every ``_target_``
    replaced by the allowed callable it names; :class:`RefusedTarget` naming ``source``,
    the refused target and where it sits otherwise."""
    if isinstance(node, list | tuple):
        return [checked(v, source, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    out = {k: checked(v, source, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if "_target_" in node:
        try:
            out["_target_"] = allowed_target(node["_target_"])
        except RefusedTarget as err:
            refused = RefusedTarget(
                f"{source}: refused _target_ {node['_target_']!r} at {where or 'the top'}: {err}"
            )
            refused.target = node["_target_"]
            raise refused from None
    return out


STORED_RESOLVED = (
    "configs in checkpoints and sidecars are stored resolved, "
    "so this file was not written by detkit"
)


def refuse_interpolations(node, source: str, where: str = "", why: str = STORED_RESOLVED) -> None:
    """Refuse ``${...}`` anywhere in the plain config ``node`` (keys and values), saying ``why``.

    Checkpoints and sidecars store their config resolved, so an interpolation in one was not
    written by detkit; resolving it would run OmegaConf resolvers (``oc.env`` reads the
    environment, ``oc.create`` makes new nodes) chosen by the file.
    """
    if isinstance(node, str) and "${" in node:
        shown = node if len(node) <= 60 else node[:57] + "..."
        raise UserError(
            f"{source}: {where or 'the config'} holds the interpolation {shown!r}; {why}"
        )
    if isinstance(node, dict):
        for key, value in node.items():
            refuse_interpolations(key, source, where, why)
            refuse_interpolations(value, source, f"{where}.{key}" if where else str(key), why)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            refuse_interpolations(value, source, f"{where}[{i}]", why)


# ----- the ``hydra:`` node ------------------------------------------------------------------
# Hydra applies its own node before the command runs: it instantiates ``hydra.callbacks``
# (and, with --multirun, the launcher and sweeper), sets ``hydra.job.env_set`` and hands
# ``hydra.job_logging``/``hydra_logging`` to ``logging.config.dictConfig``, whose ``()`` and
# ``class`` entries are calls too. A user's YAML file can hold any of them, so they are checked
# before Hydra starts (``detkit.cli``).
HYDRA_PLUGINS = frozenset(
    [
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    ]
)
LOGGING_CLASSES = frozenset(
    [
        "logging.StreamHandler",
        "logging.FileHandler",
        "logging.NullHandler",
        "logging.Formatter",
        "logging.Filter",
        "logging.handlers.RotatingFileHandler",
        "logging.handlers.TimedRotatingFileHandler",
        "logging.handlers.WatchedFileHandler",
    ]
)
LOGGING_EXTERNALS = frozenset(["ext://sys.stdout", "ext://sys.stderr"])
# Variables a config may set for the run: threads, devices and the process group's address.
# Others (PYTHONPATH, LD_PRELOAD, PATH, CC, DETKIT_ALLOWED_TARGETS, plugin paths ...) decide
# what code runs, in this process or in the DDP processes it starts: the environment's own.
ENV_SET_ALLOWED = frozenset(
    [
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
        "NCCL_DEBUG",
        "TORCH_DISTRIBUTED_DEBUG",
        "PYTORCH_CUDA_ALLOC_CONF",
    ]
)


def _check_logging(node, source: str, where: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if key == "()":
                raise RefusedTarget(f"{source}: refused the factory {value!r} at {here}")
            if key == "class" and value not in LOGGING_CLASSES:
                raise RefusedTarget(
                    f"{source}: refused the logging class {value!r} at {here}: use one of "
                    f"{sorted(LOGGING_CLASSES)}"
                )
            _check_logging(value, source, here)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _check_logging(value, source, f"{where}[{i}]")
    elif isinstance(node, str) and node.startswith("ext://") and node not in LOGGING_EXTERNALS:
        raise RefusedTarget(f"{source}: refused the external object {node!r} at {where}")


def check_hydra_node(node: dict, source: str) -> None:
    """Refuse what the composed ``hydra:`` node (a plain dict, unresolved) would run besides
    Hydra's own plugins: callbacks outside the allow-list, other launchers or sweepers,
    logging factories and classes outside :data:`LOGGING_CLASSES`, and ``env_set``
    variables outside :data:`ENV_SET_ALLOWED`."""
    checked(node.get("callbacks") or {}, source, "hydra.callbacks")
    for plugin in ("launcher", "sweeper"):
        settings = node.get(plugin) or {}
        if settings.get("_target_") not in HYDRA_PLUGINS:
            checked(settings, source, f"hydra.{plugin}")
    for name in ("job_logging", "hydra_logging"):
        _check_logging(node.get(name) or {}, source, f"hydra.{name}")
    env_set = (node.get("job") or {}).get("env_set") or {}
    refused = sorted(set(env_set) - ENV_SET_ALLOWED)
    if refused:
        raise RefusedTarget(
            f"{source}: refused hydra.job.env_set of {refused}: a config may set only "
            f"{sorted(ENV_SET_ALLOWED)}; set others in the environment before running detkit"
        )
