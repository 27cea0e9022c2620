"""Hypothesis fuzzing: malformed annotation files give clear errors, never tracebacks from
deep inside a parser (only ValueError/FileNotFoundError naming the file)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from detkit.data import COCODetection, VOCDetection, YOLODetection

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-5, 300) | st.floats() | st.text(max_size=5)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
image_entries = st.fixed_dictionaries(
    {"id": st.integers(0, 3) | json_scalars, "file_name": st.just("a.png") | json_scalars},
    optional={"width": json_scalars, "height": json_scalars},
)
ann_entries = st.fixed_dictionaries(
    {},
    optional={
        "image_id": st.integers(0, 3) | json_scalars,
        "category_id": st.integers(0, 3) | json_scalars,
        "bbox": st.lists(st.floats(allow_nan=True) | st.integers(-50, 50), max_size=5)
        | json_scalars,
        "iscrowd": json_scalars,
    },
)
coco_docs = st.fixed_dictionaries(
    {},
    optional={
        "images": st.lists(image_entries, max_size=3) | json_values,
        "annotations": st.lists(ann_entries, max_size=4) | json_values,
        "categories": st.lists(
            st.fixed_dictionaries({"id": st.integers(0, 3) | json_scalars, "name": json_scalars}),
            max_size=3,
        )
        | json_values,
    },
)

# mostly well-formed documents, so the fuzzing reaches the box and id handling too
near_valid_docs = st.fixed_dictionaries(
    {
        "images": st.lists(
            st.fixed_dictionaries(
                {"id": st.integers(1, 3), "file_name": st.sampled_from(["a.png", "b.png"])},
                optional={"width": st.integers(-1, 50) | st.floats(), "height": st.integers(-1, 9)},
            ),
            min_size=1,
            max_size=3,
        ),
        "categories": st.lists(
            st.fixed_dictionaries({"id": st.integers(1, 3), "name": st.text(max_size=3)}),
            max_size=3,
        ),
        "annotations": st.lists(
            st.fixed_dictionaries(
                {
                    "image_id": st.integers(0, 3),
                    "category_id": st.integers(0, 3),
                    "bbox": st.lists(st.floats(-100, 100) | st.integers(-50, 50), min_size=4,
                                     max_size=4),
                },
                optional={"iscrowd": st.integers(0, 1), "area": st.floats()},
            ),
            max_size=5,
        ),
    }
)  # fmt: skip


def _expect_clear(call, names: tuple[str, ...]) -> None:
    try:
        dataset = call()
    except (ValueError, FileNotFoundError) as err:
        assert any(name in str(err) for name in names), err
        return
    for i in range(len(dataset)):  # whatever was accepted must load (or name the file)
        try:
            dataset[i]
        except (ValueError, FileNotFoundError) as err:  # e.g. a recorded size not the file's
            assert any(name in str(err) for name in names), err
    dataset.to_coco()


@FUZZ
@given(doc=near_valid_docs | coco_docs | json_values, raw=st.booleans(), cut=st.integers(0, 40))
def test_coco_fuzz(doc, raw, cut):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        Image.new("RGB", (40, 30)).save(root / "a.png")
        text = json.dumps(doc)
        (root / "ann.json").write_text(text[:cut] if raw else text)
        _expect_clear(lambda: COCODetection(root, root / "ann.json"), ("ann.json", "b.png"))


xml_pieces = st.sampled_from(
    [
        "<annotation>", "</annotation>", "<object>", "</object>", "<name>cat</name>",
        "<name>dog</name>", "<name></name>", "<bndbox>", "</bndbox>", "<xmin>3</xmin>",
        "<ymin>2</ymin>", "<xmax>30</xmax>", "<ymax>20</ymax>", "<xmin>x</xmin>",
        "<xmax>-5</xmax>", "<ymax>1e9</ymax>", "<difficult>1</difficult>", "<size>",
        "</size>", "<width>40</width>", "<height>30</height>", "<width>0</width>",
        "<filename>a.png</filename>", "<filename>zz.png</filename>", "&", "<", "text",
    ]
)  # fmt: skip


@FUZZ
@given(pieces=st.lists(xml_pieces, max_size=30), names=st.sampled_from([None, ["cat", "dog"]]))
def test_voc_fuzz(pieces, names):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (root / sub).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / "a.png")
        (root / "Annotations" / "a.xml").write_text("".join(pieces))
        (root / "ImageSets/Main/train.txt").write_text("a\n")
        _expect_clear(lambda: VOCDetection(root, "train", class_names=names), ("a.xml", "zz.png"))


label_lines = st.lists(
    st.lists(
        st.sampled_from(["0", "1", "2", "-1", "0.5", "1.5", "nan", "inf", "x", "1e9", "0.25"]),
        max_size=7,
    ).map(" ".join),
    max_size=5,
).map("\n".join)
yaml_texts = st.sampled_from(
    ["names: [a, b]", "names: {0: a, 1: b}", "names: {1: a}", "names: 3", "names: [a", "- x", ""]
)


@FUZZ
@given(labels=label_lines, data_yaml=yaml_texts)
def test_yolo_fuzz(labels, data_yaml):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images/train").mkdir(parents=True)
        (root / "labels/train").mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(root / "images/train/a.png")
        (root / "labels/train/a.txt").write_text(labels)
        (root / "data.yaml").write_text(data_yaml)
        _expect_clear(
            lambda: YOLODetection(root, "train"), ("a.txt", "data.yaml", "no class names")
        )
