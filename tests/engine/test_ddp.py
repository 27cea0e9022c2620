"""Two CPU processes over gloo: training runs, the validation metric sees each image once
although the distributed sampler repeats one to even out the shards, and the run's summary
is the one a single process would write."""

import functools
import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from detkit import cli
from detkit.data import COCODetection, collate
from detkit.engine.module import DetectionModule
from detkit.eval import DetectionMetric, evaluate_coco
from detkit.testing import FakeDetector, SquaresDataset, write_squares_coco


def _val_set():
    dataset = SquaresDataset(n=5, size=64)
    # Image 0 (the one the sampler repeats) holds two same-class squares that the fake merges
    # into one wrong box: counted twice, its false positive and misses would change the AP.
    dataset.items[0] = (
        0,
        torch.tensor([[2.0, 2.0, 14.0, 14.0], [40.0, 40.0, 60.0, 60.0]]),
        torch.tensor([0, 0]),
    )
    return dataset


def _coco_results(model, dataset):
    model.eval()
    results = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        det = model(image[None]).detections[0]
        for (x1, y1, x2, y2), score, label in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": target["image_id"],
                    "category_id": dataset.label_to_category_id[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    return results


@pytest.mark.slow
def test_two_process_ddp_counts_each_validation_image_once(tmp_path):
    val = _val_set()
    module = DetectionModule(
        FakeDetector(num_classes=2),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        metric=DetectionMetric(),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    train_loader = DataLoader(SquaresDataset(n=4), batch_size=2, collate_fn=collate)
    val_loader = DataLoader(val, batch_size=2, collate_fn=collate)
    trainer.fit(module, train_loader, val_loader)

    # The weights come back from the worker processes; pycocotools scores the unique images.
    reference = evaluate_coco(
        val.to_coco(), _coco_results(module.model, val), backend="pycocotools"
    )
    assert 0 < reference["AP"] < 1
    assert trainer.callback_metrics["val/mAP"].item() == pytest.approx(reference["AP"], abs=1e-6)


@pytest.mark.slow
def test_two_process_ddp_scores_a_coco_file_as_pycocotools_does(tmp_path):
    # Five images over two processes: the sampler repeats one. Each process reads the file's
    # ground truth from its own dataset; the gathered detections count each image once.
    ann_file, data = write_squares_coco(tmp_path)
    val = COCODetection(tmp_path / "images", ann_file)
    module = DetectionModule(
        FakeDetector(num_classes=3),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        metric=DetectionMetric(num_classes=3),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    train_loader = DataLoader(SquaresDataset(n=4), batch_size=2, collate_fn=collate)
    trainer.fit(module, train_loader, DataLoader(val, batch_size=2, collate_fn=collate))

    reference = evaluate_coco(data, _coco_results(module.model, val), backend="pycocotools")
    assert 0 < reference["AP"] < 1
    logged = trainer.callback_metrics
    for name, key in (
        ("val/mAP", "AP"),
        ("val/APs", "APs"),
        ("val/APm", "APm"),
        ("val/APl", "APl"),
    ):
        assert logged[name].item() == pytest.approx(reference[key], abs=1e-6), name


@pytest.mark.slow
def test_ddp_run_of_the_digits_recipe_reports_what_one_process_would(tmp_path):
    """`detkit train trainer=ddp`: 2 processes on CPU. The summary has the real epochs, steps
    and best checkpoint, and the val/mAP logged during training is what `detkit eval` gives
    for the checkpoint on the same split (15 images: one is shared out twice)."""
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "detkit.cli", "train",
        "experiment=digits_faster_rcnn", "trainer=ddp", "trainer.max_epochs=4",
        f"data.root={tmp_path / 'digits'}", "data.n_train=15", "data.n_val=2",
        "data.image_size=128", "model.image_size=128", "data.datamodule.batch_size=2",
        # validate on the 15 training images: enough for the detector to score above 0
        "data.datamodule.val.split=train", "scheduler.warmup_steps=0",
        "callbacks.progress_bar=null", f"hydra.run.dir={run}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 4
    assert summary["steps"] == 16  # 8 images a process (one repeated), 4 batches, 4 epochs
    assert summary["checkpoint"] == str(run / "checkpoints" / "best.ckpt")
    # The best checkpoint, evaluated after training (as `detkit eval` does), scores what
    # validation logged for it; so does the last one.
    assert summary["eval"]["AP"] > 0
    assert summary["eval"]["AP"] == pytest.approx(summary["checkpoint_score"], abs=1e-6)
    last = run / "checkpoints" / "last.ckpt"
    assert cli.main(["eval", f"ckpt={last}", f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["AP"] == pytest.approx(summary["val"]["val/mAP"], abs=1e-6)
