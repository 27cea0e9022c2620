"""An exported model's sidecar is data: crafted ``transforms`` naming builtins/os callables (or
detkit functions that write files) are refused by ``OnnxDetector``, ``load_onnx_detector``,
``predict_images`` and ``detkit predict model.onnx``, in one line, and nothing runs."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from detkit import cli
from detkit.engine.predict import predict_images
from detkit.errors import UserError
from detkit.export import OnnxDetector, export_onnx, load_onnx_detector

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
