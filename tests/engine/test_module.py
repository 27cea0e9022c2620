"""The training engine on the fake detector: loss falls, metrics agree with pycocotools,
checkpoints rebuild the model alone, and resuming continues where training stopped."""

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from detkit.data import COCODetection, collate
from detkit.engine.checkpoint import load_detector, read_checkpoint
from detkit.engine.module import DetectionModule, training_targets
from detkit.engine.schedules import warmup_cosine
from detkit.eval import DetectionMetric, evaluate_coco
from detkit.testing import FakeDetector, SquaresDataset, write_squares_coco

CONFIG = {"model": {"_target_": "detkit.testing.FakeDetector", "num_classes": 2, "image_size": 64}}


def _module():
    return DetectionModule(
        FakeDetector(num_classes=2),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        scheduler=functools.partial(warmup_cosine, warmup_steps=2),
        metric=DetectionMetric(),
        config=CONFIG,
    )


def _loaders(n=8):
    dataset = SquaresDataset(n=n)
    make = functools.partial(DataLoader, dataset, batch_size=4, collate_fn=collate)
    return make(shuffle=True), make(shuffle=False)


class _StopAfter(L.Callback):
    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _trainer(tmp_path, max_epochs, callbacks_extra=(), **kwargs):
    # The same pair of checkpoint callbacks as configs/callbacks/default.yaml.
    best = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", filename="best", monitor="val/mAP", mode="max"
    )
    last = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", filename="last", enable_version_counter=False
    )
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[best, last, *callbacks_extra],
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_training_lowers_the_loss_and_logs_map_equal_to_pycocotools(tmp_path):
    train, val = _loaders()
    module = _module()
    trainer = _trainer(tmp_path, max_epochs=3)
    trainer.fit(module, train, val)
    assert module.model.weight.item() > 0.3  # moved from 0 towards 1 under the loss

    # The same detections evaluated by pycocotools through evaluate_coco's oracle backend.
    dataset = val.dataset
    module.model.eval()
    results = []
    for images, targets in val:
        for det, target in zip(module.model(images).detections, targets, strict=True):
            for box, score, label in zip(
                det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
            ):
                x1, y1, x2, y2 = box
                results.append(
                    {
                        "image_id": target["image_id"],
                        "category_id": dataset.label_to_category_id[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": score,
                    }
                )
    reference = evaluate_coco(dataset.to_coco(), results, backend="pycocotools")
    logged = trainer.callback_metrics
    assert logged["val/mAP"].item() == pytest.approx(reference["AP"], abs=1e-6)
    assert logged["val/AP50"].item() == pytest.approx(reference["AP50"], abs=1e-6)


def test_checkpoint_rebuilds_the_detector_from_itself_alone(tmp_path, monkeypatch):
    # The fake detector is no building part: allowed as users allow their own code.
    monkeypatch.setenv("DETKIT_ALLOWED_TARGETS", "detkit.testing.FakeDetector")
    train, val = _loaders()
    module = _module()
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(module, train, val)
    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(path)  # weights_only=True inside
    assert checkpoint["detkit_config"] == CONFIG
    model, config = load_detector(path)
    assert not model.training
    assert model.weight.item() == pytest.approx(module.model.weight.item())
    assert config.model._target_ == "detkit.testing.FakeDetector"


def test_resume_continues_at_the_same_step_and_matches_uninterrupted_training(tmp_path):
    train, val = _loaders()
    straight = _module()
    _trainer(tmp_path / "straight", max_epochs=4).fit(straight, train, val)

    # The same run interrupted after two of its four epochs, then resumed.
    first = _module()
    _trainer(tmp_path / "a", max_epochs=4, callbacks_extra=[_StopAfter(epochs=2)]).fit(
        first, train, val
    )
    resumed = _module()
    trainer = _trainer(tmp_path / "b", max_epochs=4)
    trainer.fit(resumed, train, val, ckpt_path=tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert trainer.global_step == 8  # 2 batches x 4 epochs, counted across the resume
    # Optimizer momentum and the schedule came back too: same weights as never stopping.
    assert resumed.model.weight.item() == pytest.approx(straight.model.weight.item(), rel=1e-6)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    train, val = _loaders()
    module = _module()
    with torch.no_grad():
        module.model.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training loss is nan"):
        _trainer(tmp_path, max_epochs=1).fit(module, train, val)


def test_crowd_regions_are_left_out_of_the_loss_targets_only():
    target = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 50, 50], [1, 1, 3, 3]]),
        "labels": torch.tensor([1, 0, 1]),
        "iscrowd": torch.tensor([False, True, False]),
        "difficult": torch.tensor([False, False, True]),
        "image_id": 3,
    }
    (cleaned,) = training_targets([target])
    assert cleaned["boxes"].tolist() == [[0.0, 0, 10, 10], [1, 1, 3, 3]]
    assert cleaned["labels"].tolist() == [1, 1]
    assert cleaned["difficult"].tolist() == [False, True]
    assert cleaned["image_id"] == 3
    assert len(target["boxes"]) == 3  # the metric's copy is untouched


def test_validation_on_a_coco_file_logs_pycocotools_numbers_on_that_file(tmp_path):
    ann_file, data = write_squares_coco(tmp_path)
    dataset = COCODetection(tmp_path / "images", ann_file)
    module = DetectionModule(
        FakeDetector(num_classes=3),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        metric=DetectionMetric(num_classes=3),
    )
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, loader)

    module.model.eval()
    results = []
    for images, targets in loader:
        for det, target in zip(module.model(images).detections, targets, strict=True):
            for box, score, label in zip(det["boxes"].double().tolist(), det["scores"].tolist(),
                                         det["labels"].tolist(), strict=True):  # fmt: skip
                x1, y1, x2, y2 = box
                results.append(
                    {
                        "image_id": target["image_id"],
                        "category_id": dataset.label_to_category_id[label],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": score,
                    }
                )
    official = evaluate_coco(data, results, backend="pycocotools")
    logged = trainer.callback_metrics
    for name in ("mAP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        key = "AP" if name == "mAP" else name
        assert logged[f"val/{name}"].item() == pytest.approx(official[key], abs=1e-6), name
    assert 0 < official["AP"] < 1
    # The file's areas decide the size stats: with w*h areas they would differ.
    boxed = {
        **data,
        "annotations": [{**a, "area": a["bbox"][2] * a["bbox"][3]} for a in data["annotations"]],
    }
    by_box = evaluate_coco(boxed, results, backend="pycocotools")
    assert any(
        abs(official[k] - by_box[k]) > 1e-3 for k in ("APs", "APm", "APl", "ARs", "ARm", "ARl")
    )


def test_channels_last_keeps_weights_and_batches_nhwc_and_the_same_losses():
    """``channels_last``: the weights and every batch in NHWC order, the SSD's loss and
    gradients those of the default layout up to float rounding."""
    from detkit.config import compose_config, safe_instantiate
    from detkit.testing import digits_batch

    images, targets = digits_batch(4, image_size=256)
    model_cfg = compose_config("train", ["experiment=digits_ssd"]).model
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        module = DetectionModule(
            safe_instantiate(model_cfg), torch.optim.SGD, channels_last=channels_last
        )
        convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(
            w.is_contiguous(memory_format=torch.channels_last) == channels_last for w in convs
        )
        loss = module.training_step((images, targets), 0)
        loss.backward()
        results.append((loss.detach(), [w.grad.clone() for w in convs]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    # BatchNorm's batch statistics and the hard-negative ranking amplify the different
    # summation order: measured up to 0.8% of a gradient's norm (a wrong layout gives ~100%).
    for a, b in zip(grads_a, grads_b, strict=True):
        assert float((b - a).norm()) <= 2e-2 * float(a.norm())
