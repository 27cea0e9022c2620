"""The demo's training loop (`detkit train experiment=digits_ssd`): images/s and where the
time goes, against the recipe as it was before issue 16 (commit 36544ce), in the same run.

Each side runs the real `detkit train` of its own tree in a subprocess (that tree first on
PYTHONPATH; the baseline is a temporary `git worktree` of the commit, removed afterwards), on
the same digits data with the same seed, for a fixed number of optimizer steps (after a few
warm-up steps) and one full validation pass. A Lightning callback and a few hooks split the
time of the main process by phase:

- data wait: the main process waiting for the next batch (the loader workers' decoding and
  augmentation when they fall behind, the transfer of the batch to the process);
- forward: normalisation, backbone, head; loss: matching, hard negatives, loss terms;
- backward; optimizer: gradient clipping and the optimizer step;
- other: logging, callbacks (progress bar, learning-rate monitor), the loop itself;
- validation: the detector's forward with post-processing, and DetectionMetric.compute;
- checkpoints written at the end of an epoch;
- a recipe with ``cache_images`` decodes each image once (its first epoch) and reads memory
  after that: its caches are filled before the timed steps, and that time counts once in the
  recipe's rate.

The recipe's rate counts what a whole run of it costs per training image: its epochs of
training steps, its validation passes (the recipe validates every
`trainer.check_val_every_n_epoch` epochs) and its checkpoints. Sides alternate (baseline,
current, baseline, ...) and each phase table is the side's fastest repeat, since load from
other processes only ever adds time.

    .venv/bin/python tools/bench_train.py [--steps 40] [--repeat 2] [--baseline 36544ce]
        [--override data.datamodule.num_workers=1 ...]   # current side only, for trials
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = "36544ce"  # the recipe as of issue 16
TARGET = 2.0
TRAIN_PHASES = ["data wait", "forward", "loss", "backward", "optimizer", "other"]
VAL_PHASES = ["data wait", "model", "metric compute", "other"]


# ----- the worker: one side's training run, timed ---------------------------------------------
class PhaseTimer:
    """Seconds per phase of the timed training steps and of the validation pass."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.train: dict[str, float] = defaultdict(float)
        self.val: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}
        self.step_starts: list[float] = []
        self.last_index = -1  # the final batch: its start ends the timed window
        self.in_val = False
        self.timing = False
        self.checkpoints = 0.0
        self.threads = 0
        self.cache_fill = 0.0

    def bucket(self) -> dict[str, float] | None:
        if self.in_val:
            return self.val
        return self.train if self.timing else None

    def add(self, phase: str, seconds: float) -> None:
        bucket = self.bucket()
        if bucket is not None:
            bucket[phase] += seconds

    def since(self, mark: str, phase: str) -> None:
        self.add(phase, time.perf_counter() - self.marks[mark])


def make_callback(timer: PhaseTimer):
    """The callback marking the phases; it runs before the recipe's own callbacks."""
    from lightning.pytorch.callbacks import Callback

    class First(Callback):
        def on_train_start(self, trainer, pl_module):
            import torch

            timer.threads = torch.get_num_threads()
            timer.last_index = int(trainer.num_training_batches) - 1
            # A recipe caching decoded images decodes each once, in its first epoch, and reads
            # memory after that: fill the caches now (timed, and counted once per run) so
            # the timed steps and validation see the steady state of a whole run.
            started = time.perf_counter()
            for dataset in (trainer.datamodule.train_dataset, trainer.datamodule.val_dataset):
                if getattr(dataset, "cache_images", False):
                    for index in range(len(dataset)):
                        dataset.load_raw(index)
            timer.cache_fill = time.perf_counter() - started

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if batch_idx == timer.warmup:
                timer.timing = True
            if batch_idx == timer.last_index:
                timer.timing = False
            if timer.warmup <= batch_idx <= timer.last_index:
                timer.step_starts.append(now)
            timer.marks["step"] = now

        def on_before_backward(self, trainer, pl_module, loss):
            timer.marks["backward"] = time.perf_counter()

        def on_after_backward(self, trainer, pl_module):
            timer.since("backward", "backward")
            timer.marks["optimizer"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.since("optimizer", "optimizer")

        def on_validation_start(self, trainer, pl_module):
            timer.in_val = True
            timer.marks["val"] = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            timer.since("val", "total")
            timer.in_val = False

    return First()


def hook_model(timer: PhaseTimer, detector) -> None:
    """Forward = start of the step to the loss; loss = the loss module; in validation the
    detector's whole forward (with post-processing) is the model phase."""

    def loss_start(module, args):
        timer.marks["loss"] = time.perf_counter()
        if not timer.in_val:
            timer.since("step", "forward")

    def loss_end(module, args, output):
        if not timer.in_val:
            timer.since("loss", "loss")

    def model_start(module, args):
        timer.marks["model"] = time.perf_counter()

    def model_end(module, args, output):
        if timer.in_val:
            timer.since("model", "model")

    detector.loss.register_forward_pre_hook(loss_start)
    detector.loss.register_forward_hook(loss_end)
    detector.register_forward_pre_hook(model_start)
    detector.register_forward_hook(model_end)


def hook_metric(timer: PhaseTimer, metric) -> None:
    compute = metric.compute

    def timed_compute(*args, **kwargs):
        started = time.perf_counter()
        try:
            return compute(*args, **kwargs)
        finally:
            timer.add("metric compute", time.perf_counter() - started)

    metric.compute = timed_compute


def hook_loaders(timer: PhaseTimer) -> None:
    """Time every batch the main process takes from a DataLoader."""
    from torch.utils.data import dataloader

    next_batch = dataloader._BaseDataLoaderIter.__next__

    def timed_next(self):
        started = time.perf_counter()
        try:
            return next_batch(self)
        finally:
            timer.add("data wait", time.perf_counter() - started)

    dataloader._BaseDataLoaderIter.__next__ = timed_next


def recipe_settings(tree: Path, overrides: list[str]) -> dict:
    """What a whole run of the tree's recipe does: epochs, validations, batch and data sizes."""
    from hydra import compose, initialize_config_dir

    config_dir = next(d for d in (tree / "detkit" / "configs", tree / "configs") if d.is_dir())
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=digits_ssd", *overrides])
    epochs = int(cfg.trainer.max_epochs)
    every = int(cfg.trainer.get("check_val_every_n_epoch") or 1)
    return {
        "epochs": epochs,
        "validations": epochs // every,
        "batch_size": int(cfg.data.datamodule.batch_size),
        "num_workers": int(cfg.data.datamodule.num_workers),
        "n_train": int(cfg.data.n_train),
        "n_val": int(cfg.data.n_val),
    }


def augmentation_ms(dataset, count: int = 32) -> float:
    """CPU milliseconds per training sample (decode + augmentation) on one thread."""
    import torch

    torch.set_num_threads(1)
    reseed = getattr(dataset, "reseed", None)
    started = time.process_time()
    for index in range(count):
        if reseed is not None:
            reseed(index)
        dataset[index]
    return (time.process_time() - started) / count * 1000


def run_worker(args: argparse.Namespace) -> int:
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))
    import lightning

    timer = PhaseTimer(args.warmup)
    first = make_callback(timer)
    built = {}

    class TimedTrainer(lightning.Trainer):
        def __init__(self, *a, callbacks=None, **kw):
            super().__init__(*a, callbacks=[first, *(callbacks or [])], **kw)

        def save_checkpoint(self, *a, **kw):
            started = time.perf_counter()
            try:
                return super().save_checkpoint(*a, **kw)
            finally:
                timer.checkpoints += time.perf_counter() - started

        def fit(self, model, *a, **kw):
            hook_model(timer, model.model)
            if getattr(model, "metric", None) is not None:
                hook_metric(timer, model.metric)
            built["datamodule"] = kw.get("datamodule")
            return super().fit(model, *a, **kw)

    # Hydra (through detkit's allow-list) finds a class by its module and name again.
    TimedTrainer.__qualname__ = TimedTrainer.__name__
    globals()["TimedTrainer"] = TimedTrainer
    lightning.Trainer = lightning.pytorch.Trainer = TimedTrainer
    hook_loaders(timer)
    from detkit.cli import main as detkit_main

    overrides = [
        "experiment=digits_ssd",
        f"hydra.run.dir={args.run_dir}",
        f"data.root={args.data_root}",
        "trainer.max_epochs=1",
        f"++trainer.limit_train_batches={args.warmup + args.steps + 1}",
        "++trainer.check_val_every_n_epoch=1",
        "++evaluate=false",
        *args.override,
    ]
    code = detkit_main(["train", *overrides])
    if code:
        return code
    starts = timer.step_starts
    result = {
        "settings": recipe_settings(tree, args.override),
        "threads": timer.threads,
        "steps": len(starts) - 1,
        "train_seconds": starts[-1] - starts[0],
        "train": dict(timer.train),
        "val": dict(timer.val),
        "checkpoints": timer.checkpoints,
        "cache_fill": timer.cache_fill,
        "augment_ms": augmentation_ms(built["datamodule"].train_dataset),
    }
    Path(args.out).write_text(json.dumps(result))
    return 0


# ----- the parent: both sides, alternating, and the table -------------------------------------
def baseline_tree(commit: str, parent: Path) -> Path:
    """A detached worktree of ``commit`` under ``parent`` (removed by :func:`remove_tree`)."""
    path = parent / f"baseline-{commit}"
    done = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(
            f"bench_train: cannot check out the baseline {commit} (a clone with its history is "
            f"needed): {done.stderr.strip()}"
        )
    return path


def remove_tree(path: Path) -> None:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True
    )
    subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)


def run_side(name: str, tree: Path, work: Path, args: argparse.Namespace, extra: list) -> dict:
    out, log = work / f"{name}.json", work / f"{name}.log"
    command = [
        sys.executable, __file__, "--worker", "--tree", str(tree), "--out", str(out),
        "--run-dir", str(work / f"{name}-run"), "--data-root", str(args.data_root),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        *(f"--override={o}" for o in extra),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree), "TRITON_INTERPRET": "1"}
    with open(log, "w") as handle:  # cwd: an empty folder, so no ./configs is picked up
        code = subprocess.call(command, cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if code or not out.is_file():
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"bench_train: the {name} run failed (exit {code}):\n" + "\n".join(tail))
    return json.loads(out.read_text())


def step_ms(result: dict) -> dict[str, float]:
    steps = result["steps"]
    phases = {p: result["train"].get(p, 0.0) / steps * 1000 for p in TRAIN_PHASES[:-1]}
    phases["other"] = result["train_seconds"] / steps * 1000 - sum(phases.values())
    return phases


def recipe_seconds(result: dict) -> dict[str, float]:
    """A whole run of the recipe at this run's speed: training, validation, checkpoints."""
    s = result["settings"]
    steps_per_epoch = -(-s["n_train"] // s["batch_size"])
    step_s = result["train_seconds"] / result["steps"]
    train = s["epochs"] * steps_per_epoch * step_s
    val = s["validations"] * result["val"]["total"]
    ckpt = s["epochs"] * result["checkpoints"]
    cache = result.get("cache_fill", 0.0)  # decoding the images once (cache_images)
    return {"train": train, "val": val, "ckpt": ckpt, "cache": cache,
            "total": train + val + ckpt + cache}  # fmt: skip


def fastest(results: list[dict]) -> dict:
    return min(results, key=lambda r: r["train_seconds"] / r["steps"])


def report(old: dict, new: dict, loads: list[float]) -> float:
    def row(label: str, a: float, b: float, unit: str = "") -> None:
        tail = f"{a / b:6.2f}x" if b > 0 else ""
        print(f"  {label:34s} {a:9.1f}{unit:4s} {b:9.1f}{unit:4s} {tail}")

    so, sn = old["settings"], new["settings"]
    print(f"  {'':34s} {'baseline':>13s} {'current':>13s}  speed-up")
    for key in ("batch_size", "num_workers", "epochs", "validations"):
        print(f"  {key:34s} {so[key]:9d}     {sn[key]:9d}")
    print(f"  {'torch threads (main process)':34s} {old['threads']:9d}     {new['threads']:9d}")
    row("augmentation ms/img (1 core, worker)", old["augment_ms"], new["augment_ms"], "ms")
    print("  train step, by phase (main process):")
    po, pn = step_ms(old), step_ms(new)
    for phase in TRAIN_PHASES:
        row(f"  {phase}", po[phase], pn[phase], "ms")
    row("  = step", sum(po.values()), sum(pn.values()), "ms")
    ips_old = so["batch_size"] * old["steps"] / old["train_seconds"]
    ips_new = sn["batch_size"] * new["steps"] / new["train_seconds"]
    print("  validation pass over the val split:")
    for phase in VAL_PHASES:
        vo, vn = old["val"], new["val"]
        if phase == "other":
            a = vo["total"] - sum(vo.get(p, 0.0) for p in VAL_PHASES[:-1])
            b = vn["total"] - sum(vn.get(p, 0.0) for p in VAL_PHASES[:-1])
        else:
            a, b = vo.get(phase, 0.0), vn.get(phase, 0.0)
        row(f"  {phase}", a, b, "s")
    row("  = validation", old["val"]["total"], new["val"]["total"], "s")
    row("checkpoints per epoch", old["checkpoints"], new["checkpoints"], "s")
    ro, rn = recipe_seconds(old), recipe_seconds(new)
    print("  a whole run of the recipe at these speeds (training, validations, checkpoints,")
    print("  decoding every image once into the cache when the recipe caches them):")
    for key in ("train", "val", "ckpt", "cache", "total"):
        row(f"  {key}", ro[key], rn[key], "s")
    rate_old = so["epochs"] * so["n_train"] / ro["total"]
    rate_new = sn["epochs"] * sn["n_train"] / rn["total"]
    speedup = rate_new / rate_old
    print(
        f"  {'training images/s, train only':34s} {ips_old:9.1f}     {ips_new:9.1f}     "
        f"{ips_new / ips_old:6.2f}x"
    )
    print(
        f"  {'recipe images/s (with val, ckpt)':34s} {rate_old:9.1f}     {rate_new:9.1f}     "
        f"{speedup:6.2f}x  (target >= {TARGET:.1f}x)"
    )
    print(
        f"  load average before/after: {loads[0]:.2f} / {loads[1]:.2f} (2 cores: above ~0.5 "
        "other work shares them)"
    )
    return speedup


def run_parent(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO))
    from detkit.data import build_digits

    build_digits(args.data_root)  # once, with the current tree (both trees build alike)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        base = baseline_tree(args.baseline, work)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "current": []}
            for k in range(args.repeat):
                for name, tree, extra in (("baseline", base, []), ("current", REPO, args.override)):
                    started = time.perf_counter()
                    runs[name].append(run_side(f"{name}{k}", tree, work, args, extra))
                    took = time.perf_counter() - started
                    print(f"  {name} run {k + 1}/{args.repeat}: {took:.0f} s", flush=True)
        finally:
            remove_tree(base)
    loads.append(os.getloadavg()[0])
    print(
        f"\ndigits_ssd training, {args.steps} steps after {args.warmup} warm-up, seed 0, "
        f"baseline {args.baseline} vs this tree (fastest of {args.repeat} each):"
    )
    report(fastest(runs["baseline"]), fastest(runs["current"]), loads)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with")
    parser.add_argument("--override", action="append", default=[],
                        help="a Hydra override for the current side only (trials)")  # fmt: skip
    cache = Path(os.environ.get("DETKIT_CACHE", Path.home() / ".cache" / "detkit"))
    parser.add_argument("--data-root", type=Path, default=cache / "digits")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return run_worker(args) if args.worker else run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
