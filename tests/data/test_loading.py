"""collate and the DetectionDataModule loaders."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from detkit.data import COCODetection, DetectionDataModule, VOCDetection, YOLODetection, collate
from detkit.data import transforms as T
from detkit.data.datamodule import seed_worker
from detkit.data.datasets.base import load_rgb, read_image_size


def test_collate_pads_bottom_right_and_keeps_targets():
    a, b = torch.rand(3, 20, 30), torch.rand(3, 25, 10)
    ta, tb = {"boxes": torch.zeros(2, 4)}, {"boxes": torch.zeros(0, 4)}
    images, targets = collate([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 25, 30)
    assert torch.equal(images[0, :, :20, :30], a) and images[0, :, 20:].abs().sum() == 0
    assert torch.equal(images[1, :, :25, :10], b) and images[1, :, :, 10:].abs().sum() == 0
    assert targets == [ta, tb]
    images, _ = collate([(a, ta), (b, tb)], pad_to_multiple=32)
    assert images.shape == (2, 3, 32, 32)


def test_datamodule_loaders(coco_dir):
    image_dir, ann, _ = coco_dir
    train = COCODetection(image_dir, ann, transforms=T.ssd_train(64))
    val = COCODetection(image_dir, ann, transforms=T.eval_resize(64))
    dm = DetectionDataModule(train=train, val=val, batch_size=3, eval_batch_size=2)
    assert dm.val_dataset is val and dm.num_classes == 12
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 64, 64) and len(targets) == 3
    ids = [t["image_id"] for batch in dm.val_dataloader() for t in batch[1]]
    assert ids == [100, 101, 102, 103]  # no shuffling, all images
    assert not dm.val_dataloader().persistent_workers


def _boxes_per_step(dataset, worker_init_fn):
    loader = DataLoader(
        dataset,
        batch_size=1,
        sampler=[0] * 6,  # the same image six times: workers take steps alternately
        num_workers=2,
        collate_fn=collate,
        worker_init_fn=worker_init_fn,
    )
    return [targets[0]["boxes"] for _, targets in loader]


def test_workers_get_distinct_augmentation_streams(coco_dir):
    image_dir, ann, _ = coco_dir
    train = COCODetection(image_dir, ann, transforms=T.ssd_train(48))
    # forked workers share albumentations' generator state unless each is reseeded
    shared = _boxes_per_step(train, None)
    assert all(torch.equal(shared[k], shared[k + 1]) for k in (0, 2, 4))
    seeded = _boxes_per_step(train, seed_worker)
    assert not all(torch.equal(seeded[k], seeded[k + 1]) for k in (0, 2, 4))
    assert DetectionDataModule(train=train, num_workers=2).train_dataloader().worker_init_fn


def test_cache_images_decodes_each_file_once_and_hands_out_copies(coco_dir):
    image_dir, ann_file, _ = coco_dir
    cached = COCODetection(image_dir, ann_file, cache_images=True)
    plain = COCODetection(image_dir, ann_file)
    first = [cached.load_raw(i)[0] for i in range(len(cached))]
    for path in image_dir.iterdir():  # from now on only the cache can answer
        path.unlink()
    for i, image in enumerate(first):
        again, record = cached.load_raw(i)
        assert record is cached.records[i] and np.array_equal(again, image)
        again[:] = 0  # a transform writing in place must not change the cache
        assert np.array_equal(cached.load_raw(i)[0], image) and image.any()
        assert cached[i][0].shape == (3, record.height, record.width)
    with pytest.raises(FileNotFoundError, match="img0.png"):
        plain.load_raw(0)  # without the cache the file is read each time


# ----- reading image files: orientation, bit depth, size limits, size records ---------------


def _write_oriented(path, upright: np.ndarray, orientation: int) -> None:
    """Store ``upright`` so that applying EXIF ``orientation`` shows it upright again."""
    inverse = {  # the transpose undoing each orientation's display transpose
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    stored = Image.fromarray(upright)
    if orientation in inverse:
        stored = stored.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, quality=95)


def _upright_with_red_box() -> np.ndarray:
    """100 wide, 200 tall; red on x 10..40, y 120..180, so any wrong turn moves it."""
    image = np.zeros((200, 100, 3), np.uint8)
    image[120:180, 10:40] = (255, 0, 0)
    return image


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_pixels_and_header_size(tmp_path, orientation, suffix):
    path = tmp_path / f"o{orientation}{suffix}"
    _write_oriented(path, _upright_with_red_box(), orientation)
    image = load_rgb(path)
    assert image.shape == (200, 100, 3)
    assert read_image_size(path) == (100, 200)  # (width, height) of the upright view
    assert image[130:170, 15:35, 0].min() > 200 and image[130:170, 15:35, 1:].max() < 60
    assert image[20:100, 50:90].max() < 60  # the rest stays black: not flipped or turned
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert np.array_equal(image, expected)


def test_exif_rotated_image_keeps_its_annotated_boxes_in_coco_and_yolo(tmp_path):
    # annotation tools label the rotated view: 100 wide, 200 tall, box on the red patch
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    _write_oriented(tmp_path / "images" / "train" / "r.jpg", _upright_with_red_box(), 6)
    (tmp_path / "labels" / "train" / "r.txt").write_text("0 0.25 0.75 0.3 0.3\n")
    ann = {
        "images": [{"id": 1, "file_name": "r.jpg", "width": 100, "height": 200}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 120, 30, 60]}],
        "categories": [{"id": 1, "name": "red"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    coco = COCODetection(tmp_path / "images" / "train", tmp_path / "ann.json")
    yolo = YOLODetection(tmp_path, "train", class_names=["red"])
    for dataset in (coco, yolo):
        image, target = dataset[0]
        assert image.shape == (3, 200, 100) and target["orig_size"].tolist() == [200, 100]
        assert target["boxes"][0].tolist() == pytest.approx([10.0, 120.0, 40.0, 180.0])
        assert image[0, 130:170, 15:35].min() > 0.8  # the box covers the red patch


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped_white(tmp_path):
    ramp = np.array([[0, 255, 256, 32768, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")  # I;16
    with Image.open(tmp_path / "ramp16.png") as img:
        assert img.mode in ("I;16", "I")
    expected = [0, 0, 1, 128, 255, 255]
    image = load_rgb(tmp_path / "ramp16.png")
    assert image.dtype == np.uint8 and image.shape == (1, 6, 3)
    assert [image[0, :, c].tolist() for c in range(3)] == [expected] * 3
    wide = np.array([[-5, 0, 32768, 65535, 70000]], dtype=np.int32)
    Image.fromarray(wide).save(tmp_path / "ramp32.tif")  # mode I: taken as 0..65535
    assert load_rgb(tmp_path / "ramp32.tif")[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(floats).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif: 32-bit float pixels \(PIL mode F\)"):
        load_rgb(tmp_path / "float.tif")


def _png_declaring(path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` (valid chunk checksum)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("side", [20000, 100000])
def test_decompression_bomb_sized_header_is_one_line_naming_file_and_pixels(tmp_path, side):
    path = tmp_path / "huge.png"
    _png_declaring(path, side, side)
    pixels = rf"huge\.png: Image size \({side * side} pixels\) exceeds limit of \d+ pixels"
    for read in (read_image_size, load_rgb):
        with pytest.raises(ValueError, match=pixels) as info:
            read(path)
        assert "MAX_IMAGE_PIXELS" in str(info.value) and "\n" not in str(info.value)


def _coco_files(tmp_path, images: list[tuple[str, tuple[int, int], tuple[int, int]]]):
    """COCO JSON + PNGs: (name, size written in the JSON, size of the file) per image."""
    data = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    for k, (name, (width, height), file_size) in enumerate(images, start=1):
        if file_size is not None:
            Image.new("RGB", file_size, (0, 255, 0)).save(tmp_path / name)
        data["images"].append({"id": k, "file_name": name, "width": width, "height": height})
        data["annotations"].append(
            {"id": k, "image_id": k, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100}
        )
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json"


def test_bomb_sized_image_is_skipped_and_counted_with_skip_bad_images(tmp_path):
    ann = _coco_files(
        tmp_path, [("huge.png", (20000, 20000), None), ("ok.png", (30, 20), (30, 20))]
    )
    _png_declaring(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(ValueError, match=r"huge\.png: Image size \(400000000 pixels\)"):
        COCODetection(tmp_path, ann)[0]
    dataset = COCODetection(tmp_path, ann, skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"skipped 1 bad image\(s\).*huge\.png.*400000000"):
        image, target = dataset[0]
    assert target["image_id"] == 2 and image.shape == (3, 20, 30)


def test_image_whose_size_differs_from_its_record_is_refused_or_skipped(tmp_path):
    # the JSON says 40x30 but the file is 30x40: boxes and orig_size would be wrong
    ann = _coco_files(tmp_path, [("bad.png", (40, 30), (30, 40)), ("ok.png", (30, 20), (30, 20))])
    dataset = COCODetection(tmp_path, ann)
    message = r"bad\.png is 30x40 \(width x height.*\) but .*ann\.json \(images id 1.*gives 40x30"
    with pytest.raises(ValueError, match=message):
        dataset[0]
    assert dataset[1][1]["orig_size"].tolist() == [20, 30]  # a matching file loads
    skipping = COCODetection(tmp_path, ann, skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"skipped 1 bad image\(s\).*bad\.png is 30x40"):
        image, target = skipping[0]
    assert target["image_id"] == 2 and image.shape == (3, 20, 30)


def _voc_files(tmp_path, entries: list[tuple[str, str | None, str | None, tuple[int, int]]]):
    """VOC layout: (id, <filename> or None, image file written or None, <size>) per image."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
    for image_id, filename, file, (width, height) in entries:
        name = f"<filename>{filename}</filename>" if filename is not None else ""
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>{name}<size><width>{width}</width><height>{height}</height></size>"
            "<object><name>dog</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>"
            "<ymax>10</ymax></bndbox></object></annotation>"
        )
        if file is not None:
            Image.new("RGB", (40, 30)).save(tmp_path / "JPEGImages" / file)
    ids = "\n".join(e[0] for e in entries)
    (tmp_path / "ImageSets" / "Main" / "trainval.txt").write_text(ids + "\n")


def test_voc_size_record_that_differs_from_the_file_is_named(tmp_path):
    _voc_files(tmp_path, [("p7", "p7.png", "p7.png", (80, 60))])
    with pytest.raises(ValueError, match=r"p7\.png is 40x30 .* but .*p7\.xml <size> gives 80x60"):
        VOCDetection(tmp_path)[0]


def test_voc_falls_back_to_the_id_named_image_and_counts_it(tmp_path):
    entries = [
        ("p5", "p5.jpg", "p5.png", (40, 30)),  # wrong extension
        ("p6", "p6", "p6.jpg", (40, 30)),  # no extension
        ("p7", "p7.png", "p7.png", (40, 30)),
    ]
    _voc_files(tmp_path, entries)
    with pytest.warns(
        UserWarning,
        match=r"2 annotation\(s\) name an image file that does not "
        r"exist; used the image named after the annotation instead, e\.g\. "
        r"'p5\.jpg' -> .*p5\.png",
    ):
        dataset = VOCDetection(tmp_path)
    assert [r.path.name for r in dataset.records] == ["p5.png", "p6.jpg", "p7.png"]
    image, target = dataset[1]
    assert image.shape == (3, 30, 40) and target["boxes"].tolist() == [[1.0, 2.0, 20.0, 10.0]]
    _voc_files(tmp_path, [("p9", "p9.jpg", None, (40, 30))])  # neither file exists
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*JPEGImages/p9\.jpg"):
        VOCDetection(tmp_path)
