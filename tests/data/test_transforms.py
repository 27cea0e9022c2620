"""Boxes stay consistent with the pixels through every recipe; eval maps back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from detkit.data import COCODetection, boxes_to_original
from detkit.data import transforms as T
from detkit.data.ssd_augment import SSDRandomCrop, ZoomOut


def colour_mask(image: torch.Tensor, colour) -> np.ndarray:
    pixels = (image.permute(1, 2, 0).numpy() * 255).astype(np.int32)
    return np.abs(pixels - np.array(colour)).max(axis=2) < 40


def assert_boxes_match_colours(image, target: dict, colours: list, coverage: bool) -> None:
    """Each box is filled with its label's colour and (``coverage``) that colour appears
    only in boxes; SSD's crop legitimately drops boxes whose centre left the patch."""
    seen = set()
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
        x1, y1, x2, y2 = box
        assert 0 <= x1 < x2 <= image.shape[2] + 1e-3 and 0 <= y1 < y2 <= image.shape[1] + 1e-3
        mask = colour_mask(image, colours[label])
        if x2 - x1 >= 6 and y2 - y1 >= 6:  # interior (away from blurred edges) is the colour
            inner = mask[int(y1) + 2 : int(y2) - 2, int(x1) + 2 : int(x2) - 2]
            assert inner.mean() > 0.9, (box, label, inner.mean())
        seen.add(label)
    for label in range(len(colours) if coverage else 0):
        mask = colour_mask(image, colours[label])
        allowed = np.zeros_like(mask)
        for box, lab in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            if lab == label:
                x1, y1, x2, y2 = box
                allowed[max(int(y1) - 2, 0) : int(y2) + 3, max(int(x1) - 2, 0) : int(x2) + 3] = 1
        stray = mask & ~allowed.astype(bool)
        # a colour left outside every box may only be a sliver of a box dropped at an edge
        assert stray.sum() <= 4 * max(image.shape[1:]), (label, stray.sum())


PIPELINES = {
    "ssd_train": lambda: T.ssd_train(160, photometric_p=0.0),
    "ssd_eval": lambda: T.ssd_eval(96),
    "yolo_train": lambda: T.yolo_train(128, mosaic_p=0.7, hsv_gains=(0, 0, 0)),
    "rcnn_train": lambda: T.rcnn_train(150, 200),
    "eval_resize": lambda: T.eval_resize([80, 120]),
}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_boxes_follow_pixels(coco_dir, colours, name):
    image_dir, ann, _ = coco_dir
    ds = COCODetection(image_dir, ann, transforms=PIPELINES[name]())
    ds.reseed(1)
    for step in range(24):
        image, target = ds[step % len(ds)]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert target["size"].tolist() == list(image.shape[1:])
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert len(target["iscrowd"]) == len(target["labels"]) == len(target["boxes"])
        assert_boxes_match_colours(image, target, colours, coverage=name != "ssd_train")


def test_yolo_mosaic_mixes_images(coco_dir):
    image_dir, ann, _ = coco_dir
    ds = COCODetection(image_dir, ann, transforms=T.yolo_train(128, mosaic_p=1.0))
    ds.reseed(0)
    sources = [set((target["labels"] // 3).tolist()) for _, target in (ds[0] for _ in range(6))]
    assert any(len(s) > 1 for s in sources)  # boxes from several source images


@pytest.mark.parametrize(
    "pipeline", [T.eval_resize(64), T.eval_resize([90, 50]), T.rcnn_eval(60, 90)]
)
def test_eval_boxes_map_back_to_original_pixels(coco_dir, pipeline):
    image_dir, ann, _ = coco_dir
    raw = COCODetection(image_dir, ann)
    resized = COCODetection(image_dir, ann, transforms=pipeline)
    for i in range(len(raw)):
        _, want = raw[i]
        _, got = resized[i]
        back = boxes_to_original(got["boxes"], got["size"], got["orig_size"])
        torch.testing.assert_close(back, want["boxes"], atol=1e-3, rtol=1e-4)


def test_rcnn_scale_rule():
    image = np.zeros((100, 300, 3), np.uint8)
    tensor, boxes, ids = T.rcnn_eval(600, 1000)(image, np.array([[0, 0, 30, 10]]), np.array([0]))
    assert tensor.shape == (3, 333, 1000)  # min(600/100, 1000/300) = 3.33
    np.testing.assert_allclose(boxes, [[0, 0, 100, 33.3]], atol=0.1)


def test_ssd_crop_keeps_boxes_by_centre_and_meets_min_iou():
    crop = SSDRandomCrop(min_ious=(0.5,), min_scale=0.3)
    crop.set_random_seed(0)
    boxes = np.array([[0.1, 0.1, 0.6, 0.5], [0.6, 0.6, 0.95, 0.9]], np.float32)
    modes = set()
    for _ in range(40):
        params = crop.get_params_dependent_on_data({"shape": (200, 200, 3)}, {"bboxes": boxes})
        x1, y1, x2, y2 = params["crop_coords"]
        modes.add(params["min_iou"])
        assert 0 <= x1 < x2 <= 200 and 0 <= y1 < y2 <= 200
        if params["min_iou"] is None:
            assert (x1, y1, x2, y2) == (0, 0, 200, 200)
        if params["min_iou"] == 0.5:
            px = boxes * 200
            inter = np.clip(
                np.minimum(px[:, 2:], [x2, y2]) - np.maximum(px[:, :2], [x1, y1]), 0, None
            )
            inter = inter.prod(1)
            union = (px[:, 2:] - px[:, :2]).prod(1) + (x2 - x1) * (y2 - y1) - inter
            assert (inter / union).max() >= 0.5 - 1e-6
        kept = crop.apply_to_bboxes(boxes, crop_coords=params["crop_coords"], shape=(200, 200))
        centres = (boxes[:, :2] + boxes[:, 2:]) * 100
        inside = ((centres > [x1, y1]) & (centres < [x2, y2])).all(1)
        assert len(kept) == inside.sum()
    assert modes == {None, -np.inf, 0.5}


def test_zoom_out_fills_with_mean_and_shifts_boxes():
    zoom = ZoomOut(max_scale=3.0, fill=(10, 20, 30), p=1.0)
    zoom.set_random_seed(3)
    image = np.full((40, 50, 3), 200, np.uint8)
    params = zoom.get_params_dependent_on_data({"shape": image.shape}, {})
    out = zoom.apply(image, **params)
    top, left = params["offset"]
    assert out.shape[:2] == params["canvas"]
    assert (out[top : top + 40, left : left + 50] == 200).all()
    assert (out[out[..., 0] != 200] == [10, 20, 30]).all()
    box = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
    moved = zoom.apply_to_bboxes(box, shape=image.shape, **params)
    h, w = params["canvas"]
    np.testing.assert_allclose(moved[0], [left / w, top / h, (left + 50) / w, (top + 40) / h])


@pytest.mark.parametrize(
    ("shape", "dtype", "fill"),
    [
        ((40, 50, 3), np.uint8, (123.675, 116.28, 103.53)),  # fractional: truncated as numpy casts
        ((40, 50, 1), np.uint8, (7, 8, 9)),
        ((40, 50, 4), np.uint8, (1, 2, 3, 4)),
        ((40, 50, 3), np.float32, (0.25, 0.5, 0.75)),
        ((40, 50, 3), np.uint16, (1000, 2000, 3000)),
        ((40, 50, 5), np.uint8, (1, 2, 3, 4, 5)),  # more channels than OpenCV fills
        ((40, 50, 3), np.float64, (0.1, 0.2, 0.3)),
    ],
)
def test_zoom_out_canvas_equals_a_filled_array(shape, dtype, fill):
    """The canvas is the image pasted into an array filled with ``fill`` cast to the image's
    dtype, whatever the channels and dtype (OpenCV fills up to 4 channels; more fall back)."""
    zoom = ZoomOut(max_scale=3.0, fill=fill, p=1.0)
    zoom.set_random_seed(5)
    rng = np.random.default_rng(0)
    image = (rng.random(shape) * 200).astype(dtype)
    params = zoom.get_params_dependent_on_data({"shape": image.shape}, {})
    out = zoom.apply(image[:, ::-1] if shape[2] == 3 else image, **params)  # a strided view too
    expected = np.empty((*params["canvas"], shape[2]), dtype)
    expected[:] = np.asarray(fill[: shape[2]], np.float32).astype(dtype)
    top, left = params["offset"]
    expected[top : top + shape[0], left : left + shape[1]] = (
        image[:, ::-1] if shape[2] == 3 else image
    )
    assert out.dtype == dtype and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_zoom_out_fill_shorter_than_the_channels_is_refused():
    zoom = ZoomOut(fill=(1, 2, 3), p=1.0)
    with pytest.raises(ValueError, match="fill has 3 values for an image of 4 channels"):
        zoom.apply(np.zeros((8, 8, 4), np.uint8), canvas=(10, 10), offset=(1, 1))


def test_builders_accept_hydra_lists():
    cfg = OmegaConf.create({"size": [64, 96], "mean": [1, 2, 3], "ious": [0.5, 0.7]})
    pipeline = T.ssd_train(cfg.size, mean=cfg.mean, min_ious=cfg.ious)
    tensor, _, _ = pipeline(np.zeros((50, 50, 3), np.uint8), np.zeros((0, 4)), np.zeros(0))
    assert tensor.shape == (3, 64, 96)


def test_bad_size_is_a_clear_error():
    with pytest.raises(ValueError, match="transform size"):
        T.eval_resize([1, 2, 3])


def test_ssd_train_leaves_out_steps_that_never_fire():
    """Steps with probability 0 are not in the pipeline, and the samples are those of the
    pipeline that keeps them: every step draws from its own generator."""
    import albumentations as A
    import cv2

    light = T.ssd_train(64, photometric_p=0.0, zoom_out_p=0.0, crop_p=0.7, flip_p=0.0)
    assert [type(t).__name__ for t in light.pipeline.transforms] == ["SSDRandomCrop", "Resize"]
    kept = T.DetectionTransform(
        [
            A.ColorJitter(p=0.0),
            ZoomOut(p=0.0),
            SSDRandomCrop(min_scale=0.3, p=0.7),
            A.HorizontalFlip(p=0.0),
            A.Resize(64, 64, interpolation=cv2.INTER_LINEAR),
        ]
    )
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 40, 50], [30, 20, 85, 70]], np.float32)
    for seed in range(12):
        light.set_random_seed(seed)
        kept.set_random_seed(seed)
        ours, theirs = light(image, boxes, np.arange(2)), kept(image, boxes, np.arange(2))
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        np.testing.assert_array_equal(ours[1], theirs[1])
        np.testing.assert_array_equal(ours[2], theirs[2])


def test_ssd_crop_trials_checked_at_once_equal_a_loop_over_them():
    """The crop's trials, drawn and checked together, accept exactly the patches a loop over
    them accepts (torchvision's box_iou as the IoU oracle); patches stay inside the image
    and within the scale and aspect limits."""
    from torchvision.ops import box_iou

    crop = SSDRandomCrop(min_scale=0.3, max_aspect=2.0, trials=200)
    crop.set_random_seed(1)
    boxes = np.array([[10, 12, 40, 60], [100, 90, 180, 170], [150, 20, 170, 45]], np.float64)
    patches = crop._sample_patches(200, 240)
    w, h = patches[:, 2] - patches[:, 0], patches[:, 3] - patches[:, 1]
    assert (patches[:, :2] >= 0).all() and (patches[:, 2] <= 240).all()
    assert (patches[:, 3] <= 200).all() and (w >= 1).all() and (h >= 1).all()
    scale = np.sqrt((w / 240) * (h / 200))
    assert scale.min() >= 0.3 - 0.02 and scale.max() <= 1.0
    for min_iou in (-np.inf, 0.1, 0.3, 0.5):
        got = crop._acceptable(patches, boxes, min_iou)
        want = []
        for patch in patches:
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            inside = ((centres > patch[:2]) & (centres < patch[2:])).all(1).any()
            iou = box_iou(torch.tensor(patch[None], dtype=torch.float64), torch.tensor(boxes))
            want.append(bool(inside) and (min_iou == -np.inf or float(iou.max()) >= min_iou))
        np.testing.assert_array_equal(got, want)
        assert 0 < got.sum() < len(got) or min_iou == 0.5


def _samples(transform, seeds, image, boxes) -> list:
    out = []
    for seed in seeds:
        transform.set_random_seed(seed)
        out.append(transform(image, boxes, np.arange(len(boxes))))
    return out


def _assert_same_samples(ours: list, theirs: list) -> None:
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])


def test_ssd_train_checks_boxes_once_and_draws_what_a_check_after_every_step_draws():
    """The SSD recipe clips and size-filters boxes after its last step only; with the paper's
    strongest zoom-out and crops, small boxes and boxes on the border, every sample equals
    the one of the same steps checked after each (albumentations' default)."""
    import albumentations as A
    import cv2

    def steps():
        return [
            A.ColorJitter(0.125, 0.5, 0.5, 0.05, p=0.5),
            ZoomOut(max_scale=4.0, p=0.5),
            SSDRandomCrop(min_scale=0.1, p=1.0),
            A.HorizontalFlip(p=0.5),
            A.Resize(48, 48, interpolation=cv2.INTER_LINEAR),
        ]

    recipe = T.ssd_train(48, max_zoom=4.0, crop_min_scale=0.1, crop_p=1.0)
    assert recipe.pipeline.processors["bboxes"].params.check_each_transform is False
    checked = T.DetectionTransform(steps())
    assert checked.pipeline.processors["bboxes"].params.check_each_transform is True
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    boxes = np.array(
        [[0, 0, 30, 40], [60, 30, 90, 70], [40, 10, 43, 13], [10, 50, 12, 52], [20, 20, 70, 60]],
        np.float32,
    )
    ours, theirs = (
        _samples(recipe, range(300), image, boxes),
        _samples(checked, range(300), image, boxes),
    )
    _assert_same_samples(ours, theirs)
    kept = [len(s[1]) for s in ours]
    assert min(kept) < len(boxes) and max(kept) == len(boxes)  # crops did drop boxes


def test_a_check_at_the_end_takes_the_minimum_box_size_in_output_pixels():
    """A crop that is then enlarged: a 0.8 px sliver of the crop is 3.2 px in the output; a
    box outside the crop goes either way."""
    import albumentations as A

    image = np.zeros((40, 40, 3), np.uint8)
    boxes = np.array([[19.2, 0.0, 25.0, 10.0], [0.0, 0.0, 5.0, 5.0]], np.float32)
    steps = [A.Crop(10, 0, 20, 10), A.Resize(40, 40)]  # the first box is 0.8 px wide here
    each = T.DetectionTransform([A.Crop(10, 0, 20, 10), A.Resize(40, 40)])
    once = T.DetectionTransform(steps, check_each_step=False)
    assert len(each(image, boxes, np.arange(2))[2]) == 0
    _, out_boxes, ids = once(image, boxes, np.arange(2))
    np.testing.assert_array_equal(ids, [0])
    np.testing.assert_allclose(out_boxes, [[36.8, 0.0, 40.0, 40.0]], atol=1e-4)


def test_closed_ssd_augmentation_is_the_recipe_without_zoom_out_and_crop():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 40, 50], [30, 20, 85, 70]], np.float32)
    full = T.ssd_train(64, zoom_out_p=0.5, crop_p=0.8)
    opened = _samples(full, range(10), image, boxes)
    full.close_augmentation()
    assert "closed" in repr(full)
    plain = T.ssd_train(64, zoom_out_p=0.0, crop_p=0.0)  # the same photometric jitter, flip
    _assert_same_samples(
        _samples(full, range(10), image, boxes), _samples(plain, range(10), image, boxes)
    )
    # Open again, it draws what it drew before it was ever closed.
    full.close_augmentation(False)
    _assert_same_samples(_samples(full, range(10), image, boxes), opened)
    # The recipe's own crops and zoom-outs did fire in those ten draws.
    assert any(
        s[0].shape != o[0].shape or not torch.equal(s[0], o[0])
        for s, o in zip(_samples(plain, range(10), image, boxes), opened, strict=True)
    )


def test_closed_yolo_augmentation_draws_no_mosaic(coco_dir):
    image_dir, ann, _ = coco_dir
    ds = COCODetection(image_dir, ann, transforms=T.yolo_train(128, mosaic_p=1.0))
    ds.close_augmentation()
    no_mosaic = COCODetection(image_dir, ann, transforms=T.yolo_train(128, mosaic_p=0.0))
    for seed in range(4):
        ds.reseed(seed)
        no_mosaic.reseed(seed)
        ours, theirs = ds[seed], no_mosaic[seed]
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
        assert torch.equal(ours[1]["boxes"], theirs[1]["boxes"])
        assert set((ours[1]["labels"] // 3).tolist()) == {seed}  # boxes of its own image only


def test_a_dataset_whose_transforms_cannot_close_says_so(coco_dir):
    image_dir, ann, _ = coco_dir
    ds = COCODetection(image_dir, ann, transforms=lambda image, boxes, ids, extra=(): None)
    with pytest.raises(ValueError, match="cannot close their augmentation"):
        ds.close_augmentation()
