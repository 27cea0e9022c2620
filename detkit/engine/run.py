"""What the ``detkit`` sub-commands do: train, evaluate, predict, export.

Each function takes the composed Hydra config; the CLI wraps them as Hydra apps.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from detkit.allowlist import RefusedTarget, checked
from detkit.config import safe_instantiate, written_where  # configs are data: allow-listed targets
from detkit.data.splits import build_split
from detkit.engine.callbacks import InterruptCheckpoint, ResumeState
from detkit.engine.checkpoint import check_resume_checkpoint, check_resume_fits
from detkit.engine.checkpoint_io import AtomicCheckpointIO
from detkit.engine.eval_data import label_map, model_class_names, relabel, replace_data
from detkit.engine.inference import coco_results, load_inference_model, run_detector
from detkit.engine.module import DetectionModule
from detkit.errors import UserError
from detkit.files import write_json
from detkit.options import switch

log = logging.getLogger("detkit")


def train(cfg: DictConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; evaluate the best checkpoint on the val split.

    A run resumed with ``ckpt_path=.../last.ckpt`` ends with the same weights and metrics as
    the run that was never stopped (see :mod:`detkit.engine.callbacks`); SIGTERM and Ctrl-C
    write that checkpoint before the process exits (with 143 or 130).
    """
    started = time.perf_counter()
    check_train_inputs(cfg)
    output_dir = Path(cfg.paths.output_dir)
    set_threads(cfg.get("torch_threads"))
    seed = L.seed_everything(cfg.seed, workers=True)
    datamodule = safe_instantiate(cfg.data.datamodule, seed=seed)
    module = DetectionModule(
        model=safe_instantiate(cfg.model),
        optimizer=safe_instantiate(cfg.optimizer),
        scheduler=safe_instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        metric=build_metric(cfg.data),
        config=OmegaConf.to_container(cfg, resolve=True),
        channels_last=bool(cfg.get("channels_last", False)),
    )
    check_class_count(module.model, datamodule)
    check_resume_fits(cfg.get("ckpt_path"), module)
    callbacks = [safe_instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks.append(ResumeState())
    interrupt = interrupt_checkpoint(cfg, output_dir)
    if interrupt is not None:
        callbacks.append(interrupt)
    loggers = [safe_instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    trainer: L.Trainer = safe_instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins(cfg.trainer)
    )
    try:
        trainer.fit(
            module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
        )
    except SIGTERMException:
        raise SystemExit(interrupt.exit_code if interrupt else 128 + signal.SIGTERM) from None
    summary = {
        "output_dir": str(output_dir),
        "train_seconds": round(time.perf_counter() - started, 1),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "val": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }
    best = best_checkpoint(trainer)
    summary["checkpoint"] = str(best) if best else None
    score = getattr(trainer.checkpoint_callback, "best_model_score", None)
    summary["checkpoint_score"] = float(score) if score is not None else None
    if cfg.get("evaluate", True) and best is not None and trainer.is_global_zero:
        metrics = evaluate_checkpoint(best, output_dir / "eval", split="val")
        summary["eval"] = {k: metrics[k] for k in ("AP", "AP50", "AP75") if k in metrics}
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    if trainer.is_global_zero:
        write_json(output_dir / "summary.json", summary, indent=2)
        log.info("run summary: %s", json.dumps(summary, indent=2))
    return summary


def set_threads(threads: int | None) -> None:
    """``torch_threads``: the training process's intra-op threads (None: torch's default).
    Loader workers always run one thread each (the DataLoader sets that)."""
    if threads is None:
        return
    if int(threads) < 1:
        raise UserError(f"torch_threads must be a positive number or null, got {threads}")
    torch.set_num_threads(int(threads))


def check_class_count(model, datamodule) -> None:
    """Refuse, before the first step, a model whose number of classes is not the training
    data's: fewer would train on labels it has no output for, more on outputs never
    labelled, and the mismatch surfaced only at the first validation."""
    names = datamodule.class_names
    if int(model.num_classes) != len(names):
        shown = ", ".join(map(str, names[:8])) + (", ..." if len(names) > 8 else "")
        raise UserError(
            f"the model predicts {int(model.num_classes)} classes (data.num_classes) but the "
            f"training data has {len(names)} ({shown}): set data.num_classes={len(names)}"
        )


def check_train_inputs(cfg: DictConfig) -> None:
    """Refuse, before anything is built, targets outside the allow-list anywhere in the config
    (each build checks its own part again) and a ``ckpt_path`` holding pickled objects."""
    source = "the train config"
    try:
        checked(OmegaConf.to_container(cfg, resolve=True), source)
    except RefusedTarget as err:
        origin = written_where(err.target) if isinstance(err.target, str) else ""
        if not origin:
            raise
        # The same refusal, naming the file or override the value came from.
        raise RefusedTarget(str(err).replace(source, source + origin, 1)) from None
    check_resume_checkpoint(cfg.get("ckpt_path"))


def plugins(trainer_cfg: DictConfig) -> list:
    """The trainer config's plugins, with checkpoints written atomically unless one of them
    already says how checkpoints are written."""
    from lightning.pytorch.plugins.io import CheckpointIO

    configured = trainer_cfg.get("plugins")
    if configured is None:
        chosen = []
    elif isinstance(configured, ListConfig | list):
        chosen = [safe_instantiate(p) for p in configured]
    else:
        chosen = [safe_instantiate(configured)]
    if not any(isinstance(p, CheckpointIO) for p in chosen):
        chosen.append(AtomicCheckpointIO())
    return chosen


def interrupt_checkpoint(cfg: DictConfig, output_dir: Path) -> InterruptCheckpoint | None:
    """The SIGTERM/Ctrl-C checkpoint callback (``checkpoint.on_interrupt``), writing
    ``checkpoint.dir/last.ckpt`` and naming the command that resumes from it."""
    settings = cfg.get("checkpoint") or {}
    if not settings.get("on_interrupt", True):
        return None
    dirpath = Path(settings.get("dir") or output_dir / "checkpoints")
    command = resume_command(output_dir, dirpath / "last.ckpt")
    return InterruptCheckpoint(dirpath=str(dirpath), filename="last", resume_command=command)


# Overrides a resume command sets itself, or Hydra, detkit and Lightning's DDP launcher add.
NOT_REPEATED = {
    "ckpt_path",
    "hydra.run.dir",
    "hydra.searchpath",
    "hydra.mode",
    "hydra.job.name",
    "hydra.output_subdir",
}


def resume_command(run_dir: Path, ckpt: Path) -> str:
    """The ``detkit train`` command line of this run, continuing in ``run_dir`` from ``ckpt``."""
    args: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # not run by Hydra
        hydra_cfg = None
    if hydra_cfg is not None:
        for source in hydra_cfg.runtime.config_sources:
            if source.provider == "command-line":
                args += ["--config-dir", source.path.removeprefix("file://")]
        for arg in [*hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task]:
            if arg.split("=", 1)[0].lstrip("+~") not in NOT_REPEATED:
                args.append(arg)
    words = [*args, f"hydra.run.dir={hydra_value(run_dir)}", f"ckpt_path={hydra_value(ckpt)}"]
    return shlex.join(["detkit", "train", *words])


def hydra_value(value) -> str:
    """``value`` as a Hydra override value: quoted unless it is plainly a word or a path.

    In Hydra's quoted strings a backslash is literal unless it precedes a quote or the end.
    """
    text = str(value)
    if re.fullmatch(r"[\w./\-]+", text):
        return text
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def best_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint ModelCheckpoint judged best (falling back to the last one)."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return None
    for candidate in (callback.best_model_path, callback.last_model_path):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build_metric(data_cfg: DictConfig):
    from detkit.eval import DetectionMetric

    names = data_cfg.get("class_names")
    return DetectionMetric(
        num_classes=data_cfg.num_classes, class_names=list(names) if names else None
    )


def evaluate(cfg: DictConfig) -> dict:
    """``detkit eval``: a results file against ground truth, or a checkpoint on a dataset."""
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("gt") is not None or cfg.get("predictions") is not None:
        if cfg.get("gt") is None or cfg.get("predictions") is None:
            raise UserError("evaluating files needs both gt=<coco.json> and predictions=<results>")
        from detkit.eval.command import run as evaluate_files

        return evaluate_files(
            gt=cfg.gt,
            predictions=cfg.predictions,
            protocol=cfg.protocol,
            output_dir=output_dir,
            backend=cfg.backend,
            score_threshold=cfg.score_threshold,
            plots=cfg.plots,
        )
    if cfg.get("ckpt") is None:
        raise UserError(
            "say what to evaluate: ckpt=<checkpoint> (a .ckpt or an exported model.onnx), "
            "or gt=<json> predictions=<json>"
        )
    data, paths = cfg.get("data"), None
    if data is not None:
        # The given dataset replaces the checkpoint's; its ${paths.*} are this run's.
        data = OmegaConf.to_container(data, resolve=False)
        paths = OmegaConf.to_container(cfg.paths, resolve=True)
    return evaluate_checkpoint(
        cfg.ckpt,
        output_dir,
        split=cfg.split,
        data=data,
        protocol=cfg.protocol,
        batch_size=cfg.batch_size,
        score_threshold=cfg.score_threshold,
        backend=cfg.backend,
        paths=paths,
        fuse_conv_bn=switch(cfg.get("fuse_conv_bn", False), "fuse_conv_bn"),
    )


def evaluate_checkpoint(
    ckpt: str | Path,
    output_dir: str | Path,
    split: str = "val",
    data: dict | None = None,
    protocol: str = "coco",
    batch_size: int = 8,
    score_threshold: float = 0.25,
    backend: str = "detkit",
    paths: dict | None = None,
    fuse_conv_bn: bool = False,
) -> dict:
    """Run a checkpoint over a dataset split, write COCO results JSON, then evaluate them.

    ``ckpt`` may also be an exported ``model.onnx``: ONNX Runtime runs it, on the dataset
    its sidecar records (the checkpoint's, at export) unless ``data`` is given.
    ``data`` replaces the dataset the model was trained on (a ``data`` config group node);
    its interpolations resolve against the checkpoint's config (transforms, model) and
    ``paths`` (the current run's). The dataset's classes must be the model's (the same names
    in another order are mapped by name). The ground truth scored against is the dataset's
    ``coco_ground_truth()``: a COCO annotation file as written (areas, crowd, ignore flags),
    restricted to the images evaluated, so ``ground_truth.json`` and ``results.json`` give
    the same numbers in pycocotools. ``backend`` computes the COCO stats. ``fuse_conv_bn``
    folds BatchNorms into convolutions and merges parallel ones (faster; detections equal up
    to float rounding).
    """
    from detkit.eval.command import check_options
    from detkit.eval.command import run as evaluate_files

    check_options(protocol, backend)  # before the model runs over the whole split
    model, config = load_inference_model(ckpt, fuse_conv_bn=fuse_conv_bn)
    names = model_class_names(config)
    if data is not None:
        config = replace_data(config, data, paths)
    elif config.data.get("datamodule") is None:  # an ONNX model exported without its data
        raise UserError(f"{ckpt} records no dataset to evaluate on: pass data=<dataset>")
    dataset = build_split(config, split)
    mapping = label_map(int(model.num_classes), names, dataset, ckpt)
    output_dir = Path(output_dir)
    detections = relabel(run_detector(model, dataset, batch_size=batch_size), mapping)
    results = coco_results(detections, dataset)
    results_path = write_json(output_dir / "results.json", results)
    # A dataset class of the user's own may only have to_coco().
    truth = getattr(dataset, "coco_ground_truth", dataset.to_coco)()
    gt_path = write_json(output_dir / "ground_truth.json", truth)
    log.info("wrote %d detections to %s", len(results), results_path)
    return evaluate_files(
        gt=str(gt_path),
        predictions=str(results_path),
        protocol=protocol,
        output_dir=output_dir,
        backend=backend,
        score_threshold=score_threshold,
    )


def predict(cfg: DictConfig) -> list[dict]:
    """``detkit predict``: draw detections on images and write them as JSON."""
    from detkit.engine.predict import predict_images

    if cfg.get("ckpt") is None or cfg.get("source") is None:
        raise UserError("predict needs ckpt=<checkpoint> and source=<image, folder or glob>")
    return predict_images(
        cfg.ckpt,
        cfg.source,
        Path(cfg.paths.output_dir),
        score_threshold=cfg.score_threshold,
        batch_size=cfg.batch_size,
        max_images=cfg.get("max_images"),
        fuse_conv_bn=switch(cfg.get("fuse_conv_bn", True), "fuse_conv_bn"),
    )


def export(cfg: DictConfig) -> dict:
    """``detkit export``: ``model.onnx`` + ``model.json`` in the run dir, checked in onnxruntime."""
    from detkit.engine.export import export_checkpoint

    result = export_checkpoint(
        cfg.get("ckpt"),
        Path(cfg.paths.output_dir),
        format=cfg.format,
        nms=cfg.nms,
        dynamic_batch=cfg.dynamic_batch,
        image_size=cfg.get("image_size"),
        opset=cfg.get("opset"),
        verify=cfg.get("verify", True),
        tolerance=cfg.get("tolerance", 1e-3),
    )
    return {"onnx": str(result.onnx_path), "sidecar": str(result.sidecar_path)}
