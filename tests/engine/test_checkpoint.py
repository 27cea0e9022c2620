"""A checkpoint is data: a crafted one naming builtins/os/subprocess callables (or detkit
functions that write files) anywhere in its config is refused by every entry point, with one
line naming the file and the target, and nothing runs; ``ckpt_path=`` refuses a pickle bomb."""

from __future__ import annotations

import json

import pytest
import torch

from detkit import cli
from detkit.engine.checkpoint import check_resume_checkpoint, load_detector
from detkit.errors import UserError
from detkit.models import SSD

# The names of tests/conftest.py's hostile_nodes (checked below).
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
PLACES = ["model", "list", "args", "interpolation"]


def _refusal(ckpt, target: str) -> str:
    return f"checkpoint {ckpt}: refused _target_ {target!r} at "


def test_the_payloads_are_the_shared_ones(hostile):
    assert sorted(hostile("x")) == sorted(PAYLOADS)


def test_the_genuine_checkpoint_loads(write_checkpoint):
    model, config = load_detector(write_checkpoint("genuine.ckpt"))
    assert isinstance(model, SSD) and config.data.num_classes == 10


def test_inference_runs_in_the_layout_the_checkpoint_was_trained_in(write_checkpoint):
    from detkit.engine.inference import load_inference_model

    def with_layout(name: str, channels_last: bool):
        path = write_checkpoint(name)
        checkpoint = torch.load(path, weights_only=False)
        checkpoint["detkit_config"]["channels_last"] = channels_last
        torch.save(checkpoint, path)
        return load_inference_model(path)[0]

    plain, nhwc = with_layout("plain.ckpt", False), with_layout("nhwc.ckpt", True)

    def weights(model):
        return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]

    assert all(w.is_contiguous() for w in weights(plain))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights(nhwc))
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[256, 256], [200, 240]])
    with torch.inference_mode():
        ours, theirs = nhwc.predict_padded(images, sizes), plain.predict_padded(images, sizes)
    assert theirs[3].min() > 10  # random weights still give detections to compare
    for mine, reference in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_load_detector_refuses_every_hostile_target(write_checkpoint, hostile, tmp_path, payload):
    marker = tmp_path / "marker"
    ckpt = write_checkpoint("crafted.ckpt", "model", hostile(marker)[payload])
    with pytest.raises(UserError) as caught:
        load_detector(ckpt)
    assert str(caught.value).startswith(_refusal(ckpt, payload) + "model.backbone: ")
    assert "\n" not in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("where", [*PLACES, "transforms", "data"])
def test_load_detector_refuses_a_target_hidden_anywhere(write_checkpoint, hostile, tmp_path, where):
    marker = tmp_path / "marker"
    ckpt = write_checkpoint("crafted.ckpt", where, hostile(marker)["builtins.open"])
    with pytest.raises(UserError, match="builtins.open|interpolation") as caught:
        load_detector(ckpt)
    assert str(caught.value).startswith(f"checkpoint {ckpt}: ")
    assert not marker.exists()


def test_an_interpolation_in_a_checkpoint_is_refused_not_resolved(
    write_checkpoint, hostile, tmp_path
):
    marker = tmp_path / "marker"
    ckpt = write_checkpoint("crafted.ckpt", "interpolation", hostile(marker)["os.system"])
    with pytest.raises(UserError) as caught:
        load_detector(ckpt)
    assert str(caught.value) == (
        f"checkpoint {ckpt}: model.backbone._target_ holds the interpolation '${{evil}}'; "
        "configs in checkpoints and sidecars are stored resolved, so this file was not "
        "written by detkit"
    )
    assert not marker.exists()


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(args)
    return code, capsys.readouterr().err


# Each command with each place its original code instantiated from the checkpoint.
COMMANDS = [
    ("eval", "model", "os.system"),
    ("eval", "data", "builtins.open"),
    ("eval", "list", "detkit.files.write_text"),
    ("predict", "transforms", "builtins.exec"),
    ("predict", "args", "posix.system"),
    ("predict", "interpolation", "builtins.open"),
    ("export", "model", "subprocess.check_call"),
    ("export", "list", "detkit.data.build_digits"),
    ("export", "args", "pathlib.Path.touch"),
]


@pytest.mark.parametrize(("command", "where", "payload"), COMMANDS)
def test_each_command_refuses_a_crafted_checkpoint_in_one_line(
    write_checkpoint, hostile, tmp_path, capsys, command, where, payload
):
    marker = tmp_path / "marker"
    ckpt = write_checkpoint("crafted.ckpt", where, hostile(marker)[payload])
    images = tmp_path / "images"
    images.mkdir()
    torch.manual_seed(0)
    from PIL import Image

    Image.new("RGB", (40, 30)).save(images / "a.png")
    extra = [f"source={images}"] if command == "predict" else []
    run_dir = tmp_path / "run"
    code, err = _run_cli([command, f"ckpt={ckpt}", *extra, f"hydra.run.dir={run_dir}"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"detkit: error: checkpoint {ckpt}: ")
    assert repr(payload) in lines[0] or "'${evil}'" in lines[0]
    assert not marker.exists()
    assert not (run_dir / "detections.json").exists() and not (run_dir / "model.onnx").exists()


class _PickleBomb:
    """Unpickling this calls ``func(*args)``: what a crafted Lightning checkpoint carries."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _bombs(marker):
    import os

    return {
        "builtins.open": _PickleBomb(open, str(marker), "w"),
        "os.system": _PickleBomb(os.system, f"touch '{marker}'"),
    }


@pytest.mark.parametrize("bomb", ["builtins.open", "os.system"])
def test_resume_check_refuses_a_pickle_bomb(tmp_path, bomb):
    marker = tmp_path / "marker"
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 1, "x": _bombs(marker)[bomb]}, path)
    with pytest.raises(UserError) as caught:
        check_resume_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {path} holds objects outside torch's safe types (")
    assert not marker.exists()
    check_resume_checkpoint(None)  # no resume, and Lightning's own names, are left alone
    check_resume_checkpoint("last")


@pytest.mark.parametrize("unsafe_default", [False, True])
def test_train_refuses_a_pickle_bomb_as_ckpt_path(tmp_path, capsys, monkeypatch, unsafe_default):
    # With TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD set, torch.load without an explicit weights_only
    # unpickles anything: the resume must say weights_only=True itself.
    if unsafe_default:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    bomb = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": 1, "x": _bombs(marker)["os.system"]}, bomb)
    args = [
        "train",
        "experiment=digits_ssd",
        "trainer.max_epochs=1",
        f"data.root={tmp_path / 'digits'}",
        "data.n_train=16",
        "data.n_val=6",
        "data.datamodule.num_workers=0",
        "callbacks.progress_bar=null",
        f"ckpt_path={bomb}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    code, err = _run_cli(args, capsys)
    assert code == 1
    assert err.strip().splitlines() == [
        f"detkit: error: checkpoint {bomb} holds objects outside torch's safe types (posix.system)"
        ", so it was not written by `detkit train`; detkit loads checkpoints with "
        "weights_only=True only "
        "(load it yourself with weights_only=False only if you trust where it came from)"
    ]
    assert not marker.exists()


def test_our_own_checkpoints_resume_with_weights_only(tmp_path, capsys):
    """``last.ckpt`` of ``detkit train`` (with the EMA callback, whose averaged weights it
    holds) passes the resume check and resumes under weights_only=True."""
    common = [
        "experiment=digits_ssd",
        f"data.root={tmp_path / 'digits'}",
        "data.n_train=16",
        "data.n_val=6",
        "data.datamodule.batch_size=8",
        "data.datamodule.num_workers=0",
        "callbacks=ema",
        "callbacks.ema.update_starting_at_step=0",
        "callbacks.progress_bar=null",
        "evaluate=false",
    ]
    first = tmp_path / "first"
    assert cli.main(["train", *common, "trainer.max_epochs=1", f"hydra.run.dir={first}"]) == 0
    last = first / "checkpoints" / "last.ckpt"
    assert "averaging_state" in torch.load(last, weights_only=True)
    check_resume_checkpoint(last)
    resumed = tmp_path / "resumed"
    args = ["trainer.max_epochs=2", f"ckpt_path={last}", f"hydra.run.dir={resumed}"]
    assert cli.main(["train", *common, *args]) == 0
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 4  # 2 batches x 2 epochs, counted across the resume


def _set_everywhere(node, key, value):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                node[k] = value
            else:
                _set_everywhere(v, key, value)


def _edited(path, edit):
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["detkit_config"].pop("model"), "its config has no model section"),
        (lambda c: c["detkit_config"].pop("transforms"), "has no transforms section"),
        (lambda c: c["detkit_config"].pop("data"), "has no data section"),
        (lambda c: c.pop("state_dict"), "has no state_dict"),
        (
            lambda c: _set_everywhere(c["detkit_config"]["model"], "num_classes", 12),
            r"does not fit its own model config: head\.\S+ is torch.Size\(\[\d+(, \d+)*\]\), "
            r"the config builds torch.Size",
        ),
    ],
)
def test_incomplete_checkpoints_are_one_line(write_checkpoint, edit, message):
    path = _edited(write_checkpoint("edited.ckpt"), edit)
    from detkit.engine.inference import load_inference_model

    with pytest.raises(UserError, match=message) as caught:
        load_inference_model(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_unreadable_checkpoint_files_are_one_line(tmp_path):
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.ckpt could not be read: the file is empty"):
        load_detector(empty)
    folder = tmp_path / "folder.ckpt"
    folder.mkdir()
    for check in (load_detector, check_resume_checkpoint):
        with pytest.raises(UserError, match="folder.ckpt is a directory, not a checkpoint file"):
            check(folder)


def test_resume_refuses_checkpoints_not_written_by_detkit_train(write_checkpoint, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2)}, weights)
    foreign = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.5.0", "epoch": 1}, foreign)
    for path in (weights, foreign, write_checkpoint("no_lightning.ckpt")):
        with pytest.raises(UserError, match="was not written by `detkit train`"):
            check_resume_checkpoint(path)


def test_resume_refuses_a_checkpoint_of_another_model(write_checkpoint, tmp_path):
    from detkit.config import compose_config, safe_instantiate
    from detkit.engine.checkpoint import check_resume_fits

    path = _edited(
        write_checkpoint("ssd.ckpt"), lambda c: c.update({"pytorch-lightning_version": "2.5.0"})
    )
    check_resume_checkpoint(path)
    yolo = torch.nn.Module()
    yolo.model = safe_instantiate(compose_config("train", ["experiment=digits_yolo"]).model)
    with pytest.raises(
        UserError, match=r"does not fit this run's model \(\d+ missing, \d+ unexpec"
    ):
        check_resume_fits(path, yolo)
    ssd = torch.nn.Module()
    ssd.model = safe_instantiate(compose_config("train", ["experiment=digits_ssd"]).model)
    check_resume_fits(path, ssd)  # its own model fits
