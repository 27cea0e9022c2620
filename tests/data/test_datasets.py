"""COCO / VOC / YOLO readers: parsing, sanitising, bad input, to_coco() round trips."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from detkit.data import COCODetection, VOCDetection, YOLODetection


def load_with_pycocotools(gt: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))  # must be plain JSON
        coco.createIndex()
    return coco


def test_coco_items_and_round_trip(coco_dir):
    image_dir, ann, data = coco_dir
    ds = COCODetection(image_dir, ann)
    assert len(ds) == 4
    assert ds.class_names == [f"c{k}" for k in range(12)]
    assert ds.label_to_category_id == list(range(10, 22))
    image, target = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, 120, 160)
    assert image.min() >= 0.0 and image.max() <= 1.0
    want = np.array([a["bbox"] for a in data["annotations"] if a["image_id"] == 101], np.float32)
    want[:, 2:] += want[:, :2]
    torch.testing.assert_close(target["boxes"], torch.from_numpy(want))
    assert target["labels"].tolist() == [3, 4, 5]
    assert target["image_id"] == 101 and target["orig_size"].tolist() == [120, 160]
    gt = ds.to_coco()
    coco = load_with_pycocotools(gt)
    assert sorted(coco.getImgIds()) == [100, 101, 102, 103]
    for a, b in zip(gt["annotations"], data["annotations"], strict=True):
        assert a["bbox"] == pytest.approx(b["bbox"]) and a["category_id"] == b["category_id"]
    # the pixels inside each box are its colour (the image really matches its boxes)
    for box in target["boxes"].round().long().tolist():
        patch = image[:, box[1] : box[3], box[0] : box[2]]
        assert patch.std(dim=(1, 2)).max() < 1e-6


def test_coco_bad_boxes_are_clipped_or_dropped_and_counted(coco_dir, tmp_path):
    image_dir, _, data = coco_dir
    data["annotations"][0]["bbox"] = [-10, -5, 50, 40]  # partly outside: clipped
    data["annotations"][1]["bbox"] = [10, 10, 0, 5]  # zero width: dropped
    data["annotations"][2]["bbox"] = [500, 500, 10, 10]  # wholly outside: dropped
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"clipped 1 box.*dropped 2"):
        ds = COCODetection(image_dir, ann)
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0.0, 0.0, 40.0, 35.0]]


def test_coco_negative_images_kept(coco_dir, tmp_path):
    image_dir, _, data = coco_dir
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 102]
    ann = tmp_path / "neg.json"
    ann.write_text(json.dumps(data))
    ds = COCODetection(image_dir, ann)
    _, target = ds[2]
    assert len(ds) == 4 and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_coco_missing_and_corrupt_images(coco_dir, tmp_path):
    image_dir, ann, _ = coco_dir
    (image_dir / "img3.png").unlink()
    with pytest.raises(FileNotFoundError, match="img3.png"):
        COCODetection(image_dir, ann)
    with pytest.warns(UserWarning, match="skipped 1 missing"):
        ds = COCODetection(image_dir, ann, skip_bad_images=True)
    assert len(ds) == 3
    (image_dir / "img3.png").write_bytes((image_dir / "img2.png").read_bytes())
    (image_dir / "img1.png").write_bytes(b"not a png")
    ds = COCODetection(image_dir, ann, skip_bad_images=True)
    with pytest.raises(ValueError, match="img1.png"):
        COCODetection(image_dir, ann, skip_bad_images=False)[1]
    with pytest.warns(UserWarning, match="img1.png"):
        _, target = ds[1]
    assert target["image_id"] == 102  # substituted by the next good image


@pytest.mark.filterwarnings("ignore:.*skipped 1 missing", "ignore:.*no 'area'")
def test_coco_ground_truth_is_the_file_as_written_on_the_images_kept(coco_dir, tmp_path):
    image_dir, _, data = coco_dir
    data["info"] = {"description": "kept"}
    anns = data["annotations"]
    anns[0].update(bbox=[-10.25, -5.5, 50.5, 40.125], area=321.5, iscrowd=1)  # clipped in to_coco
    anns[1].update(bbox=[10.1, 10.2, 0.3, 0.4], ignore=1)  # sub-pixel, flagged
    del anns[4]["area"]  # pycocotools needs one: w*h is filled in, with a warning
    ann = tmp_path / "as_written.json"
    ann.write_text(json.dumps(data))
    (image_dir / "img3.png").unlink()
    with pytest.warns(UserWarning, match="clipped 1 box"):
        ds = COCODetection(image_dir, ann, skip_bad_images=True)
    with pytest.warns(UserWarning, match="as_written.json: 1 annotation.*no 'area'"):
        truth = ds.coco_ground_truth()
    kept = [a for a in json.loads(ann.read_text())["annotations"] if a["image_id"] != 103]
    kept[4]["area"] = kept[4]["bbox"][2] * kept[4]["bbox"][3]
    assert truth["annotations"] == kept
    assert truth["images"] == data["images"][:3]  # img3 could not be read: not evaluated
    assert truth["categories"] == data["categories"] and truth["info"] == data["info"]
    truth["annotations"][0]["area"] = 0  # a copy: the dataset's own data stay as read
    assert ds.coco_ground_truth()["annotations"][0]["area"] == 321.5
    assert ds.to_coco()["annotations"][0]["bbox"] == [0.0, 0.0, 40.25, 34.625]


def test_coco_malformed_json_names_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json.*malformed JSON"):
        COCODetection(tmp_path, bad)
    ann = {"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}
    images = [{"id": 1, "file_name": "a.png"}]
    bad.write_text(json.dumps({"images": images, "categories": [], "annotations": [ann]}))
    with pytest.raises(ValueError, match="unknown category_id 3"):
        COCODetection(tmp_path, bad)
    images.append({"id": 1, "file_name": "b.png"})
    bad.write_text(json.dumps({"images": images, "categories": [], "annotations": []}))
    with pytest.raises(ValueError, match="broken.json: image ids are not unique"):
        COCODetection(tmp_path, bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        COCODetection(tmp_path, tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["annotations"][1].pop("id"), r"annotations\[1\] needs an integer 'id'"),
        (lambda d: d["annotations"][1].update(id=1), r"annotations\[1\] repeats the annot"),
        (lambda d: d["annotations"][2]["bbox"].__setitem__(0, math.nan), r"\[2\]\.bbox \[nan"),
        (lambda d: d["categories"].append(dict(d["categories"][0])), "category ids are not"),
        (lambda d: d.update(images=[], annotations=[]), "the 'images' list is empty"),
    ],
)  # fmt: skip
def test_coco_annotation_file_problems_are_named_before_pycocotools_sees_them(
    coco_dir, tmp_path, edit, message
):
    image_dir, ann_file, data = coco_dir
    data = json.loads(json.dumps(data))
    edit(data)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"edited.json: .*{message}"):
        COCODetection(image_dir, edited)


def write_voc(root: Path, objects_per_image: list[list[tuple]], ext: str = ".jpg") -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i, objects in enumerate(objects_per_image):
        image_id = f"2007_{i:06d}"
        ids.append(image_id)
        Image.new("RGB", (200, 100), (40, 40, 40)).save(root / "JPEGImages" / f"{image_id}{ext}")
        objs = "".join(
            f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for n, b, d in objects
        )
        xml = (
            f"<annotation><filename>{image_id}{ext}</filename><size><width>200</width>"
            f"<height>100</height><depth>3</depth></size>{objs}</annotation>"
        )
        (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets/Main/train.txt").write_text("\n".join(ids) + "\n")


def test_voc_parse_difficult_and_round_trip(tmp_path):
    write_voc(
        tmp_path,
        [[("dog", (11, 21, 60, 80), False), ("cat", (100, 10, 150, 90), True)], []],
        ext=".png",
    )
    ds = VOCDetection(tmp_path, "train")
    assert ds.class_names == ["cat", "dog"]  # discovered, sorted
    _, target = ds[0]
    # VOC's 1-based inclusive pixels become 0-based continuous coordinates
    assert target["boxes"].tolist() == [[10.0, 20.0, 60.0, 80.0], [99.0, 9.0, 150.0, 90.0]]
    assert target["labels"].tolist() == [1, 0]
    assert target["difficult"].tolist() == [False, True]
    assert ds[1][1]["boxes"].shape == (0, 4)  # negatives kept
    gt = ds.to_coco()
    coco = load_with_pycocotools(gt)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[target["image_id"]]))
    assert [a.get("ignore", 0) for a in anns] == [0, 1]
    assert anns[0]["bbox"] == [10.0, 20.0, 50.0, 60.0]
    no_difficult = VOCDetection(tmp_path, "train", use_difficult=False)
    assert no_difficult[0][1]["labels"].tolist() == [1]
    assert len(no_difficult.to_coco()["annotations"]) == 2  # eval still sees them


def test_voc_unknown_class_and_bad_xml(tmp_path):
    write_voc(tmp_path, [[("zebra", (1, 1, 5, 5), False)]])
    with pytest.raises(ValueError, match=r"unknown class name\(s\) \['zebra'\]; known: \['cat'"):
        VOCDetection(tmp_path, "train", class_names=["cat", "dog"])
    xml = next((tmp_path / "Annotations").iterdir())
    xml.write_text("<annotation><object><name>cat</name></object")
    with pytest.raises(ValueError, match=f"{xml.name}.*malformed XML"):
        VOCDetection(tmp_path, "train")
    xml.write_text("<annotation><object><name>cat</name><bndbox><xmin>a</xmin></bndbox>"
                   "</object></annotation>")  # fmt: skip
    with pytest.raises(ValueError, match=f"{xml.name}.*not a number"):
        VOCDetection(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="val.txt"):
        VOCDetection(tmp_path, "val")


@pytest.mark.parametrize(
    ("written", "difficult"),
    [("1", True), ("0", False), ("", False), ("1.0", True), ("0.0", False), ("True", True),
     ("false", False), (" 1 ", True)],
)  # fmt: skip
def test_voc_difficult_flag_spellings(tmp_path, written, difficult):
    write_voc(tmp_path, [[("dog", (11, 21, 60, 80), False)]])
    xml = next((tmp_path / "Annotations").iterdir())
    xml.write_text(
        xml.read_text().replace("<difficult>0</difficult>", f"<difficult>{written}</difficult>")
    )
    assert VOCDetection(tmp_path, "train")[0][1]["difficult"].tolist() == [difficult]


def test_voc_bad_difficult_flag_and_a_split_file_with_a_byte_order_mark(tmp_path):
    write_voc(tmp_path, [[("dog", (11, 21, 60, 80), False)]])
    split = tmp_path / "ImageSets/Main/train.txt"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes().replace(b"\n", b"\r\n"))
    assert len(VOCDetection(tmp_path, "train")) == 1
    xml = next((tmp_path / "Annotations").iterdir())
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>2</difficult>"))
    with pytest.raises(ValueError, match=f"{xml.name}: <difficult> is '2', expected 0 or 1"):
        VOCDetection(tmp_path, "train")


def test_voc_missing_image_without_size_is_named_without_a_box_warning(tmp_path):
    write_voc(tmp_path, [[("dog", (11, 21, 60, 80), False)]])
    xml = next((tmp_path / "Annotations").iterdir())
    xml.write_text(re.sub(r"<size>.*</size>", "", xml.read_text()))
    next((tmp_path / "JPEGImages").iterdir()).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "dropped 1 box" for a box of an unknown image
        with pytest.raises(FileNotFoundError, match="image file not found"):
            VOCDetection(tmp_path, "train")


def write_yolo(root: Path, names, rows_per_image, split="train", yaml_names=True):
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i, rows in enumerate(rows_per_image):
        Image.new("RGB", (200, 100)).save(root / "images" / split / f"{i}.jpg")
        if rows is not None:
            text = "\n".join(" ".join(str(v) for v in r) for r in rows)
            (root / "labels" / split / f"{i}.txt").write_text(text)
    if yaml_names:
        (root / "data.yaml").write_text(
            f"path: {root}\ntrain: images/train\nval: images/val\nnames: {names}\n"
        )


@pytest.mark.parametrize("names", [["a", "b"], {0: "a", 1: "b"}])
def test_yolo_parse_and_round_trip(tmp_path, names):
    write_yolo(tmp_path, names, [[(1, 0.5, 0.5, 0.2, 0.4), (0, 0.1, 0.1, 0.1, 0.1)], None])
    for root in (tmp_path, tmp_path / "data.yaml"):
        ds = YOLODetection(root, "train")
        assert ds.class_names == ["a", "b"] and len(ds) == 2
        _, target = ds[0]
        torch.testing.assert_close(
            target["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [10.0, 5.0, 30.0, 15.0]])
        )
        assert target["labels"].tolist() == [1, 0]
        assert ds[1][1]["boxes"].shape == (0, 4)  # no label file: a negative
    coco = load_with_pycocotools(ds.to_coco())
    got = np.array([a["bbox"] for a in coco.loadAnns(coco.getAnnIds())])
    np.testing.assert_allclose(got, [[80.0, 30.0, 40.0, 40.0], [10.0, 5.0, 20.0, 10.0]], rtol=1e-6)


def test_yolo_bad_labels(tmp_path):
    write_yolo(tmp_path, ["a"], [[(3, 0.5, 0.5, 0.2, 0.2)]])
    with pytest.raises(ValueError, match=r"0\.txt:1: unknown class id 3; known: \{0: 'a'\}"):
        YOLODetection(tmp_path, "train")
    (tmp_path / "labels/train/0.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(ValueError, match=r"0\.txt:1: expected 5 values"):
        YOLODetection(tmp_path, "train")
    (tmp_path / "data.yaml").write_text("names: [a\n")
    with pytest.raises(ValueError, match="data.yaml: malformed YAML"):
        YOLODetection(tmp_path, "train")


def yolo_yaml(root: Path, text: str) -> Path:
    (root / "data.yaml").write_text(text + "\nnames: [a, b]\n")
    return root / "data.yaml"


@pytest.mark.parametrize(
    "path_line", ["", "path: null\n", "path: .\n"], ids=["no-path", "null-path", "dot-path"]
)
def test_yolo_yaml_without_path_uses_its_folder_from_a_relative_root(
    tmp_path, monkeypatch, path_line
):
    write_yolo(tmp_path / "ds", ["a", "b"], [[(1, 0.5, 0.5, 0.2, 0.4)]], yaml_names=False)
    yolo_yaml(tmp_path / "ds", path_line + "train: images/train")
    monkeypatch.chdir(tmp_path)
    for root in ("ds", "ds/data.yaml"):
        ds = YOLODetection(root, "train")
        np.testing.assert_allclose(ds.records[0].boxes, [[80.0, 30.0, 120.0, 70.0]], rtol=1e-6)


def test_yolo_relative_yaml_path_is_relative_to_the_yaml(tmp_path, monkeypatch):
    write_yolo(tmp_path / "ds", ["a"], [[(0, 0.5, 0.5, 0.2, 0.4)]], yaml_names=False)
    (tmp_path / "cfg").mkdir()
    yolo_yaml(tmp_path / "cfg", "path: ../ds\ntrain: images/train")
    monkeypatch.chdir(tmp_path / "ds")  # the working directory plays no part
    assert len(YOLODetection(tmp_path / "cfg/data.yaml", "train")) == 1


def test_yolo_roboflow_parent_paths_are_retried_in_the_yaml_folder(tmp_path):
    for split, cls in (("train", 0), ("valid", 1)):
        write_yolo(
            tmp_path / split, ["a", "b"], [[(cls, 0.5, 0.5, 0.2, 0.4)]], split=".", yaml_names=False
        )
    yolo_yaml(tmp_path, "train: ../train/images\nval: ../valid/images\ntest: ../test/images")
    for split, cls in (("train", 0), ("val", 1)):
        ds = YOLODetection(tmp_path / "data.yaml", split)
        assert ds.records[0].labels.tolist() == [cls]
        np.testing.assert_allclose(ds.records[0].boxes, [[80.0, 30.0, 120.0, 70.0]], rtol=1e-6)
    with pytest.raises(FileNotFoundError, match=r"not found: .*test/images"):
        YOLODetection(tmp_path / "data.yaml", "test")


def test_yolo_image_list_splits(tmp_path):
    write_yolo(tmp_path, ["a", "b"], [[(0, 0.5, 0.5, 0.2, 0.4)], [(1, 0.1, 0.1, 0.1, 0.1)]])
    write_yolo(tmp_path, ["a", "b"], [[(1, 0.5, 0.5, 0.2, 0.4)]], split="extra", yaml_names=False)
    (tmp_path / "lists").mkdir()
    # './' is relative to the list's folder, other relative paths to the dataset root
    (tmp_path / "lists/train.txt").write_text("./../images/train/1.jpg\nimages/extra/0.jpg\n\n")
    yolo_yaml(tmp_path, "train: lists/train.txt\nval: [images/train, lists/train.txt]")
    ds = YOLODetection(tmp_path / "data.yaml", "train")
    assert [r.file_name for r in ds.records] == [
        "lists/../images/train/1.jpg",
        "images/extra/0.jpg",
    ]
    assert [r.labels.tolist() for r in ds.records] == [[1], [1]]
    np.testing.assert_allclose(ds.records[1].boxes, [[80.0, 30.0, 120.0, 70.0]], rtol=1e-6)
    ds = YOLODetection(tmp_path / "data.yaml", "val")
    assert [r.labels.tolist() for r in ds.records] == [[0], [1], [1], [1]]
    assert ds.records[0].file_name == "images/train/0.jpg"
    (tmp_path / "lists/train.txt").write_text("images/extra/0.jpg\nimages/extra/0.txt\n")
    with pytest.raises(ValueError, match=r"train\.txt:2: 'images/extra/0\.txt' is not an image"):
        YOLODetection(tmp_path / "data.yaml", "train")
    (tmp_path / "lists/train.txt").write_text("images/extra/0.jpg\nimages/extra/9.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*9\.jpg \(1 of 2"):
        YOLODetection(tmp_path / "data.yaml", "train")
    (tmp_path / "lists/train.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"image list not found: .*lists/train\.txt"):
        YOLODetection(tmp_path / "data.yaml", "train")


def test_yolo_polygon_labels_become_their_boxes_and_are_counted(tmp_path):
    polygon = (1, 0.1, 0.1, 0.5, 0.1, 0.5, 0.6, 0.1, 0.6)
    write_yolo(tmp_path, ["a", "b"], [[polygon, (0, 0.5, 0.5, 0.2, 0.4)], [polygon[:7]]])
    with pytest.warns(UserWarning, match=r"train: converted 2 polygon label\(s\) to their box$"):
        ds = YOLODetection(tmp_path, "train")
    np.testing.assert_allclose(
        ds.records[0].boxes, [[20.0, 10.0, 100.0, 60.0], [80.0, 30.0, 120.0, 70.0]], rtol=1e-5
    )
    np.testing.assert_allclose(ds.records[1].boxes, [[20.0, 10.0, 100.0, 60.0]], rtol=1e-5)
    assert [r.labels.tolist() for r in ds.records] == [[1, 0], [1]]
    (tmp_path / "labels/train/1.txt").write_text(
        "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.5 0.1 0.5 0.6 0.1\n"
    )
    with pytest.raises(ValueError, match=r"1\.txt:2: expected 5 values .* or a polygon .*, got 8"):
        YOLODetection(tmp_path, "train")


@pytest.mark.parametrize("cls", ["nan", "inf", "-inf", "1e999"])
def test_yolo_non_finite_class_id_names_the_line(tmp_path, cls):
    write_yolo(tmp_path, ["a"], [[(0, 0.5, 0.5, 0.2, 0.2), (cls, 0.5, 0.5, 0.1, 0.1)]])
    with pytest.raises(ValueError, match=rf"0\.txt:2: unknown class id {cls}; known"):
        YOLODetection(tmp_path, "train")


def test_yolo_label_file_not_utf8_is_named(tmp_path):
    write_yolo(tmp_path, ["a"], [[(0, 0.5, 0.5, 0.2, 0.2)]])
    (tmp_path / "labels/train/0.txt").write_bytes("0 0.5 0.5 0.1 0.1 # café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels/train/0\.txt: not UTF-8 text \(byte 23"):
        YOLODetection(tmp_path, "train")


def test_yolo_orphan_label_files_and_duplicate_rows_are_counted(tmp_path):
    row, other = (0, 0.5, 0.5, 0.2, 0.4), (1, 0.1, 0.1, 0.1, 0.1)
    write_yolo(tmp_path, ["a", "b"], [[row, other, row, row], [other, other], [row], [row]])
    for name in ("2.jpg", "3.jpg"):
        (tmp_path / "images/train" / name).unlink()  # their label files are left behind
    (tmp_path / "labels/train/classes.txt").write_text("a\nb\n")  # a class list, no label file
    with pytest.warns(UserWarning) as caught:
        ds = YOLODetection(tmp_path, "train")
    assert [str(w.message) for w in caught] == [
        f"YOLO {tmp_path}/images/train: dropped 3 duplicate label row(s); "
        f"2 label file(s) have no image, e.g. {tmp_path}/labels/train/2.txt"
    ]
    assert [r.labels.tolist() for r in ds.records] == [[0, 1], [1]]
    np.testing.assert_allclose(
        ds.records[0].boxes, [[80.0, 30.0, 120.0, 70.0], [10.0, 5.0, 30.0, 15.0]], rtol=1e-6
    )
