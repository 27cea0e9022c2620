"""The ``detkit`` command: ``detkit train|eval|export|predict|data [action] [overrides]``.

Each sub-command is a Hydra app over ``configs/<name>.yaml``; everything after the
sub-command (and, for ``data``, its action word) is a Hydra override such as
``experiment=digits_ssd trainer.max_epochs=3``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

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
composed configuration and --cfg job to print it."""

# The Hydra config and the function behind each sub-command.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "detkit.engine.run:train"),
    "eval": ("eval", "detkit.engine.run:evaluate"),
    "predict": ("predict", "detkit.engine.run:predict"),
    "export": ("export", "detkit.engine.run:export"),
    "data": ("data_tool", "detkit.data.command:run"),
}


def config_dir() -> Path:
    """``configs/`` beside the package (the repository root in an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"detkit configs not found next to {here}")


def _load(target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def run_hydra_app(config_name: str, target: str, overrides: list[str]) -> None:
    """Run ``target(cfg)`` as a Hydra app with ``overrides`` as its command line."""
    import hydra
    from omegaconf import DictConfig

    @hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        try:
            _load(target)(cfg)
        except NotBuiltError as err:
            _fail(f"{err}", code=3)
        except (UserError, FileNotFoundError, ValueError) as err:
            # Bad input: one clear line. DETKIT_DEBUG=1 shows where it came from.
            if os.environ.get("DETKIT_DEBUG"):
                raise
            _fail(f"error: {err}", code=1)

    # Hydra parses sys.argv; hand it the overrides as if they were the whole command line.
    saved = sys.argv
    sys.argv = [f"detkit {config_name}", *overrides]
    try:
        app()
    finally:
        sys.argv = saved


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
    try:
        run_hydra_app(config_name, target, rest)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    return 0


def _fail(message: str, code: int) -> None:
    print(f"detkit: {message}", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
