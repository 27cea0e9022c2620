"""An exported model run by ONNX Runtime stands in for its checkpoint.

- ``detkit eval ckpt=model.onnx`` gives the checkpoint's detections, stats and files, on the
  dataset recorded at export or on one given with ``data=``, for every family.
- Its sidecar is data: crafted ``transforms`` or ``data`` naming builtins/os callables (or
  detkit functions that write files) are refused by ``OnnxDetector``, ``load_onnx_detector``,
  ``predict_images``, ``detkit predict`` and ``detkit eval``, in one line, and nothing runs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from detkit import cli
from detkit.engine.predict import predict_images
from detkit.errors import UserError
from detkit.export import OnnxDetector, compare_detections, export_onnx, load_onnx_detector
from detkit.testing import save_detector_checkpoint

GENUINE_TRANSFORMS = {"_target_": "detkit.data.transforms.ssd_eval", "size": 256}


@pytest.fixture(scope="module")
def genuine(helpers, tmp_path_factory):
    """``model.onnx`` and its sidecar, exported from a small SSD."""
    model, _ = helpers.build_model("ssd_digits")
    out = tmp_path_factory.mktemp("genuine")
    names = [str(i) for i in range(10)]
    result = export_onnx(
        model, out, class_names=names, transforms=GENUINE_TRANSFORMS, verify=False, optimize=False
    )
    return result.onnx_path


def _plant(info: dict, where: str, node: dict) -> dict:
    if where == "top":
        info["transforms"] = node
    elif where == "list":
        info["transforms"] = {**GENUINE_TRANSFORMS, "size": [256, {"deep": [node]}]}
    elif where == "args":
        info["transforms"] = {**GENUINE_TRANSFORMS, "_args_": [node]}
    elif where == "data":  # the dataset detkit eval builds
        info["data"] = {"class_names": info["class_names"], "datamodule": {"val": node}}
    elif where == "interpolation":  # the target spelled as a reference to a class name
        info["class_names"][0] = node["_target_"]
        info["transforms"] = {**node, "_target_": "${data.class_names[0]}"}
    return info


@pytest.fixture
def crafted(genuine, hostile, tmp_path):
    """``crafted(where, payload) -> (model.onnx, sidecar, marker)``: the genuine graph with a
    sidecar whose transforms hide a hostile node."""

    def make(where: str, payload: str):
        marker = tmp_path / "marker"
        folder = tmp_path / "exported"
        folder.mkdir()
        onnx_path = shutil.copy(genuine, folder / "model.onnx")
        info = json.loads(genuine.with_suffix(".json").read_text())
        sidecar = folder / "model.json"
        sidecar.write_text(json.dumps(_plant(info, where, hostile(marker)[payload])))
        return onnx_path, sidecar, marker

    return make


def test_the_genuine_sidecar_loads(genuine):
    detector, config = load_onnx_detector(genuine)
    assert config.transforms.eval == GENUINE_TRANSFORMS
    assert detector.class_names == [str(i) for i in range(10)]


PAYLOADS = [
    "builtins.open",
    "os.system",
    "posix.system",
    "subprocess.check_call",
    "builtins.exec",
    "pathlib.Path.touch",
    "detkit.files.write_text",
    "detkit.data.build_digits",
]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("load", [OnnxDetector, load_onnx_detector])
def test_the_library_refuses_a_crafted_sidecar(crafted, load, payload):
    onnx_path, sidecar, marker = crafted("top", payload)
    with pytest.raises(UserError) as caught:
        load(onnx_path)
    assert str(caught.value).startswith(
        f"sidecar {sidecar}: refused _target_ {payload!r} at transforms: "
    )
    assert "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["top", "list", "args", "interpolation"])
def test_predict_images_refuses_a_target_hidden_anywhere_in_the_sidecar(crafted, tmp_path, where):
    onnx_path, sidecar, marker = crafted(where, "builtins.open")
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="builtins.open|interpolation") as caught:
        predict_images(onnx_path, tmp_path / "a.png", tmp_path / "out")
    assert str(caught.value).startswith(f"sidecar {sidecar}: ")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("where", "payload"),
    [("top", "os.system"), ("list", "pathlib.Path.touch"), ("args", "detkit.files.write_text")],
)
def test_predict_command_refuses_a_crafted_sidecar_in_one_line(
    crafted, tmp_path, capsys, where, payload
):
    onnx_path, sidecar, marker = crafted(where, payload)
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    run_dir = tmp_path / "run"
    capsys.readouterr()
    args = ["predict", f"ckpt={onnx_path}", f"source={tmp_path / 'a.png'}"]
    code = cli.main([*args, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"detkit: error: sidecar {sidecar}: refused _target_ {payload!r}")
    assert not marker.exists()
    assert not (run_dir / "detections.json").exists()


@pytest.mark.parametrize("payload", ["builtins.open", "detkit.data.build_digits"])
def test_eval_command_refuses_a_target_hidden_in_the_recorded_data(
    crafted, tmp_path, capsys, payload
):
    onnx_path, sidecar, marker = crafted("data", payload)
    capsys.readouterr()
    code = cli.main(["eval", f"ckpt={onnx_path}", f"hydra.run.dir={tmp_path / 'run'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"detkit: error: sidecar {sidecar}: refused _target_ {payload!r} at data.datamodule.val"
    )
    assert not marker.exists()
    assert not (tmp_path / "run" / "results.json").exists()


def test_eval_of_a_model_exported_without_its_data_asks_for_data(genuine, tmp_path, capsys):
    code = cli.main(["eval", f"ckpt={genuine}", f"hydra.run.dir={tmp_path}"])
    assert code == 1
    assert f"{genuine} records no dataset" in capsys.readouterr().err


# ----- detkit eval ckpt=model.onnx against detkit eval ckpt=<its checkpoint> -------------------
FAMILIES = ["ssd_digits", "yolo_digits", "yolov8_digits", "faster_rcnn_digits"]
OUTPUT_FILES = ["metrics.json", "results.json", "ground_truth.json"]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module", params=FAMILIES)
def exported_family(request, helpers, digits_root, tmp_path_factory):
    """``(checkpoint, model.onnx)`` of one family: random weights calibrated as for the parity
    tests, trained on a digits set of 8 val images (built once, shared by the families)."""
    root = tmp_path_factory.mktemp(request.param)
    data = (f"data.root={digits_root}", "data.n_train=0", "data.n_val=8")
    model, cfg = helpers.build_model(request.param, data)
    helpers.calibrate(model)
    ckpt = save_detector_checkpoint(root / "model.ckpt", model, cfg)
    export = ["export", f"ckpt={ckpt}", "verify=false", f"hydra.run.dir={root / 'export'}"]
    assert cli.main(export) == 0
    return ckpt, root / "export" / "model.onnx"


def _evaluate(model, out, *extra) -> dict:
    assert cli.main(["eval", f"ckpt={model}", *extra, f"hydra.run.dir={out}"]) == 0
    return {name: json.loads((out / name).read_text()) for name in OUTPUT_FILES}


def _by_image(results: list[dict]) -> dict[int, dict]:
    """COCO results grouped per image as xyxy detections, for :func:`compare_detections`."""
    grouped: dict[int, list] = {}
    for r in results:
        grouped.setdefault(r["image_id"], []).append(r)
    out = {}
    for image_id, rows in grouped.items():
        xywh = torch.tensor([r["bbox"] for r in rows], dtype=torch.float64)
        out[image_id] = {
            "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            "scores": torch.tensor([r["score"] for r in rows]),
            "labels": torch.tensor([r["category_id"] for r in rows]),
        }
    return out


def test_eval_of_the_exported_model_equals_eval_of_its_checkpoint(exported_family, tmp_path):
    """On the dataset the sidecar recorded (no data=): the same detections in the image
    files' pixels, the same ground truth, stats and files."""
    ckpt, onnx_path = exported_family
    ours = _evaluate(ckpt, tmp_path / "ckpt")
    theirs = _evaluate(onnx_path, tmp_path / "onnx")
    assert theirs["ground_truth.json"] == ours["ground_truth.json"]
    assert len(ours["ground_truth.json"]["images"]) == 8
    want, got = _by_image(ours["results.json"]), _by_image(theirs["results.json"])
    assert set(got) == set(want) and len(want) == 8
    for image_id in want:
        match = compare_detections([want[image_id]], [got[image_id]], score_tolerance=1e-5)
        assert match.unmatched == 0 and match.matched > 0
        # float32 convolutions summed in other orders (onnxruntime's MLAS, oneDNN): on real
        # images the deepest family (anchor-free YOLO) measured score differences of 1.0e-5
        assert match.max_box_diff < 1e-3 and match.max_score_diff < 3e-5
    stats = ours["metrics.json"]["stats"], theirs["metrics.json"]["stats"]
    np.testing.assert_allclose(stats[1], stats[0], rtol=0, atol=1e-3)
    # Random weights may miss every digit (the anchor-free YOLO's do: AP 0 here); the next
    # test scores both models against objects near their detections, where AP is well above 0.
    assert len(ours["results.json"]) >= 8
    made = {p.name for p in (tmp_path / "ckpt").iterdir() if p.name != ".hydra"}
    assert {p.name for p in (tmp_path / "onnx").iterdir() if p.name != ".hydra"} == made
    assert any(name.endswith(".png") for name in made)  # the plots


def _near_detections(results: list[dict], truth: dict, seed: int = 0) -> dict:
    """A COCO file over the same images whose objects are the checkpoint's 3 best detections
    per image, moved and resized by up to ~10%: AP of the model is well above 0 and moves
    with every box, so equal APs mean something."""
    rng = np.random.default_rng(seed)
    data = {"images": truth["images"], "annotations": [], "categories": truth["categories"]}
    for image in truth["images"]:
        rows = sorted(
            (r for r in results if r["image_id"] == image["id"]), key=lambda r: -r["score"]
        )
        for r in rows[:3]:
            x, y, w, h = r["bbox"]
            dx, dy = rng.uniform(-0.1, 0.1, 2) * (w, h)
            box = [x + dx, y + dy, w * rng.uniform(0.9, 1.1), h * rng.uniform(0.9, 1.1)]
            data["annotations"].append(
                {"id": len(data["annotations"]) + 1, "image_id": image["id"],
                 "category_id": r["category_id"], "bbox": box, "area": box[2] * box[3],
                 "iscrowd": 0}
            )  # fmt: skip
    return data


def test_eval_of_the_exported_model_on_data_given_gives_the_checkpoints_ap(
    exported_family, digits_root, tmp_path
):
    """``data=`` replaces the recorded dataset, as for a checkpoint; on objects near the
    model's own detections AP is far from 0, and the exported model's is the checkpoint's."""
    ckpt, onnx_path = exported_family
    first = _evaluate(ckpt, tmp_path / "recorded")
    ann_file = tmp_path / "near.json"
    near = _near_detections(first["results.json"], first["ground_truth.json"])
    ann_file.write_text(json.dumps(near))
    data = ["data=coco", f"data.val_images={digits_root / 'val'}", f"data.val_ann={ann_file}"]
    ours = _evaluate(ckpt, tmp_path / "ckpt", *data)["metrics.json"]
    theirs = _evaluate(onnx_path, tmp_path / "onnx", *data)["metrics.json"]
    assert ours["AP"] > 0.05
    assert abs(theirs["AP"] - ours["AP"]) < 1e-3
    np.testing.assert_allclose(theirs["stats"], ours["stats"], rtol=0, atol=1e-3)


def test_an_image_larger_than_the_graph_maps_back_per_axis(genuine):
    """A 301x517 image is scaled to 149x256 to fit the 256x256 graph: boxes come back by
    517/256 in x and 301/149 in y (one factor for both axes would be off by ~0.2 px in y)."""
    detector = OnnxDetector(genuine)
    image = torch.rand(1, 3, 301, 517, generator=torch.Generator().manual_seed(3))
    small = torch.nn.functional.interpolate(image, size=(149, 256), mode="bilinear")
    want = detector(small).detections[0]
    got = detector(image).detections[0]
    assert len(want["boxes"]) > 10
    factors = torch.tensor([517 / 256, 301 / 149, 517 / 256, 301 / 149])
    torch.testing.assert_close(got["boxes"], want["boxes"] * factors, rtol=0, atol=1e-3)
    torch.testing.assert_close(got["scores"], want["scores"])


def _edited_copy(genuine, tmp_path, edit):
    folder = tmp_path / "edited"
    folder.mkdir()
    onnx_path = shutil.copy(genuine, folder / "model.onnx")
    info = json.loads(genuine.with_suffix(".json").read_text())
    edit(info)
    (folder / "model.json").write_text(json.dumps(info))
    return onnx_path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i: i.update(class_names=["a", "b", "c"]), "num_classes must be the number of"),
        (lambda i: i.update(class_names="abc"), "class_names must be a non-empty list of str"),
        (lambda i: i.update(data={"class_names": ["a"]}), "data.class_names must be absent or"),
        (lambda i: i.pop("input"), r"input.image_size must be \[height, width\]"),
        (lambda i: i["input"].update(image_size="256"), r"input.image_size must be \[height"),
        (lambda i: i.update(nms="yes"), "nms must be true or false"),
        (lambda i: i["postprocess"].pop("max_detections"), "max_detections must be a positive"),
    ],
)
def test_an_edited_sidecar_is_one_line_naming_the_field(genuine, tmp_path, edit, message):
    onnx_path = _edited_copy(genuine, tmp_path, edit)
    with pytest.raises(UserError, match=message) as caught:
        OnnxDetector(onnx_path)
    assert str(caught.value).startswith(f"sidecar {onnx_path.with_suffix('.json')}: ")


def test_a_graph_that_names_more_classes_than_its_sidecar_is_refused(genuine, tmp_path):
    def fewer(info):
        info.update(class_names=["a", "b"], num_classes=2)

    detector = OnnxDetector(_edited_copy(genuine, tmp_path, fewer))
    detector.info["postprocess"]["score_threshold"] = 0.0
    images = torch.rand(1, 3, 256, 256)
    with pytest.raises(UserError, match=r"gave class \d+ but its sidecar names 2 classes"):
        detector.predict_padded(images)


def test_a_file_that_is_not_onnx_is_one_line(genuine, tmp_path):
    # a sidecar from before graph_sha256 was recorded: the graph itself is then loaded
    onnx_path = _edited_copy(genuine, tmp_path, lambda info: info.pop("graph_sha256"))
    onnx_path.write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match=f"ONNX model {onnx_path} cannot be loaded: "):
        OnnxDetector(onnx_path)


def test_a_sidecar_next_to_another_graph_is_refused(genuine, tmp_path):
    info = json.loads(genuine.with_suffix(".json").read_text())
    assert len(info["graph_sha256"]) == 64  # the export records the graph it describes
    onnx_path = _edited_copy(genuine, tmp_path, lambda info: None)
    OnnxDetector(onnx_path)  # the pair as exported
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")  # another graph (a crash mid-rename)
    with pytest.raises(UserError, match=r"was written for another graph than .*model.onnx"):
        OnnxDetector(onnx_path)
