"""The ``detkit`` command: ``detkit train|eval|export|predict|data [action] [overrides]``.

Each sub-command is a Hydra app over the packaged ``detkit/configs/<name>.yaml``; everything
after the sub-command (and, for ``data``, its action word) is a Hydra override such as
``experiment=digits_ssd trainer.max_epochs=3``. Users' own config folders join the search path
as :mod:`detkit.config` describes (``--config-dir DIR``, ``./configs``, ``DETKIT_CONFIG_PATH``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from detkit.config import CONFIG_DIR, search_path_overrides
from detkit.errors import NotBuiltError, UserError

USAGE = """usage: detkit <command> [overrides...]

commands:
  train     train a detector            detkit train experiment=digits_ssd
  eval      evaluate a checkpoint or a results file
            detkit eval ckpt=runs/.../best.ckpt
            detkit eval gt=coco.json predictions=results.json protocol=coco|voc07|voc12
  predict   draw detections on images   detkit predict ckpt=... source=images/
  export    export to ONNX              detkit export ckpt=... format=onnx
  data      dataset tools               detkit data digits|browse|stats|anchors [...]

Overrides are Hydra's: key=value, group=option; add --help after the command for the
composed configuration and --cfg job to print it. Your own configs (experiment/mine.yaml,
data/mine.yaml, ...) go in ./configs or --config-dir DIR, searched before detkit's."""

# The Hydra config and the function behind each sub-command.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "detkit.engine.run:train"),
    "eval": ("eval", "detkit.engine.run:evaluate"),
    "predict": ("predict", "detkit.engine.run:predict"),
    "export": ("export", "detkit.engine.run:export"),
    "data": ("data_tool", "detkit.data.command:run"),
}


def _load(target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def run_hydra_app(
    config_name: str, target: str, overrides: list[str], argv: list[str] | None = None
) -> None:
    """Run ``target(cfg)`` as a Hydra app with ``overrides`` as its command line.

    ``argv`` is the process's real command line (``detkit train ...``), put back in
    ``sys.argv`` while ``target`` runs: Lightning's DDP launcher starts the other processes
    by running ``sys.argv`` again.
    """
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        if argv is not None:
            sys.argv = list(argv)
        try:
            _load(target)(cfg)
        except NotBuiltError as err:
            _fail(f"{err}", code=3)
        except (UserError, FileNotFoundError, ValueError) as err:
            # Bad input: one clear line. DETKIT_DEBUG=1 shows where it came from.
            if os.environ.get("DETKIT_DEBUG"):
                raise
            _fail(f"error: {err}", code=1)

    hydra_argv = with_search_path(overrides)
    check_hydra_settings(config_name, hydra_argv)
    # Hydra parses sys.argv; hand it the overrides as if they were the whole command line.
    saved = sys.argv
    sys.argv = [f"detkit {config_name}", *hydra_argv]
    try:
        app()
    finally:
        sys.argv = saved


def check_hydra_settings(config_name: str, hydra_argv: list[str]) -> None:
    """Compose the config as the Hydra app will, and refuse in one line what its ``hydra:``
    node would run before the command starts (:func:`detkit.allowlist.check_hydra_node`):
    Hydra applies that node itself, before any of detkit's checks of the task's config. A
    config that does not compose (a YAML error, an unknown override) gets one line too."""
    import yaml
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path, get_args_parser
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from detkit.allowlist import check_hydra_node

    parser = get_args_parser()
    parser.error = _raise_option_error  # one line here, not argparse's usage block (twice)
    try:
        args = parser.parse_args(hydra_argv)
    except OptionError as err:
        message, hint = str(err), f"see `detkit {config_name} --help`"
        unrecognized = message.partition("unrecognized arguments: ")[2].split()
        if any("=" in arg and not arg.startswith("-") for arg in unrecognized):
            # argparse takes the overrides before the first option, then refuses the rest
            hint = f"options go before the key=value overrides; {hint}"
        _fail(f"error: {message} ({hint})", code=2)
    if args.help or args.hydra_help or args.shell_completion:
        return  # these print the config and exit: nothing in it runs
    # The search path hydra.main builds: the packaged configs, then --config-dir's.
    search_path = create_automatic_config_search_path(__file__, None, str(CONFIG_DIR))
    if args.config_dir is not None:
        config_dir = os.path.abspath(args.config_dir)
        if not os.path.isdir(config_dir):
            _fail(f"error: --config-dir {config_dir} is not a directory", code=1)
        search_path.prepend(
            provider="command-line",
            path=f"file://{config_dir}",
            anchor=SearchPathQuery(provider="schema"),
        )
    mode = RunMode.MULTIRUN if args.multirun else RunMode.RUN
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="detkit", config_search_path=search_path)
        cfg = hydra.compose_config(config_name, list(args.overrides), run_mode=mode)
        check_hydra_node(OmegaConf.to_container(cfg.hydra), "the hydra: settings")
        if mode == RunMode.RUN and args.cfg is None and args.info is None:
            check_run_dir(str(cfg.hydra.run.dir))
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        if os.environ.get("DETKIT_DEBUG"):
            raise
        _fail(f"error: {' '.join(str(err).split())}", code=1)
    except UserError as err:
        _fail(f"error: {err}", code=1)
    finally:
        GlobalHydra.instance().clear()


def check_run_dir(run_dir: str) -> None:
    """Refuse, in one line, a run directory that cannot be made: Hydra creates it (and opens
    its log file there) before the command starts, and fails with a traceback. Checked by
    making and removing a scratch folder in its nearest existing ancestor, so nothing is left
    behind (the run's own folder name holds a time stamp Hydra takes again)."""
    import tempfile
    from pathlib import Path

    target = Path(run_dir).absolute()
    ancestor = next(p for p in (target, *target.parents) if p.exists())
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(f"{ancestor} is not a directory")
        with tempfile.TemporaryDirectory(dir=ancestor):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        _fail(f"error: hydra.run.dir {target}: cannot write in {ancestor}: {reason}", code=1)


def with_search_path(args: list[str]) -> list[str]:
    """``args`` with the users' config folders on Hydra's search path (unless the user set
    ``hydra.searchpath``). Hydra reads overrides as one run of positional arguments, so ours
    joins the user's run (or starts one before the flags)."""
    if any(a.startswith("hydra.searchpath") for a in args):
        return list(args)
    first = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), 0)
    return [*args[:first], *search_path_overrides(), *args[first:]]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"detkit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command == "data" and rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"action={rest[0]}", *rest[1:]]
    config_name, target = COMMANDS[command]
    # Only a real command line can be run again (by Lightning's DDP launcher).
    launch = [sys.argv[0], *args] if argv is None else None
    try:
        run_hydra_app(config_name, target, rest, argv=launch)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    return 0


class OptionError(ValueError):
    """A command-line option the Hydra app does not know, or a malformed one."""


def _raise_option_error(message: str):
    raise OptionError(message)


def _fail(message: str, code: int) -> None:
    print(f"detkit: {message}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
