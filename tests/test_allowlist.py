"""The allow-list of ``_target_`` names: detkit's building parts (under any of their import
paths), the named third-party callables, the user's opt-in; everything else refused by name,
before anything is imported."""

from __future__ import annotations

import sys

import lightning
import pytest
import torch
import yaml

import detkit.data
import detkit.models
from detkit.allowlist import THIRD_PARTY, RefusedTarget, allowed_target, checked
from detkit.config import CONFIG_DIR, compose_config
from detkit.data.transforms import ssd_eval
from detkit.models.detectors.ssd import SSD


def _targets(node):
    """Every ``_target_`` value in a YAML document, however deep."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


PACKAGED = sorted(
    {t for p in CONFIG_DIR.rglob("*.yaml") for t in _targets(yaml.safe_load(p.read_text()))}
)


def test_the_packaged_configs_name_targets_in_many_places():
    assert len(PACKAGED) > 40  # the scan found the configs (models, data, trainer...)


@pytest.mark.parametrize("target", PACKAGED)
def test_every_target_of_the_packaged_configs_is_allowed(target):
    assert callable(allowed_target(target))


def _experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize(
    "overrides",
    [[f"experiment={name}"] for name in _experiments()]
    + [["callbacks=ema", "logger=csv_tensorboard", "optimizer=adamw", "scheduler=warmup_multistep"]]
    + [["scheduler=none", "trainer=cpu"]],
)
def test_every_composed_packaged_config_passes_whole(overrides):
    from omegaconf import OmegaConf

    paths = ["paths.output_dir=/nonexistent/run", "paths.cache_dir=/nonexistent/cache"]
    cfg = compose_config("train", [*overrides, *paths])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    built = checked(resolved, "the config")
    assert built["trainer"]["_target_"] is lightning.Trainer
    assert isinstance(built["model"]["_target_"], type)


def test_aliases_of_one_class_are_the_same_class():
    assert allowed_target("detkit.models.SSD") is SSD
    assert allowed_target("detkit.models.detectors.ssd.SSD") is SSD
    assert allowed_target("detkit.data.COCODetection") is detkit.data.COCODetection
    assert allowed_target("detkit.data.datasets.coco.COCODetection") is detkit.data.COCODetection
    assert allowed_target("detkit.data.transforms.ssd_eval") is ssd_eval


def test_third_party_names_are_exact():
    assert allowed_target("torch.optim.SGD") is torch.optim.SGD
    assert allowed_target("lightning.pytorch.callbacks.EMAWeightAveraging") is (
        lightning.pytorch.callbacks.EMAWeightAveraging
    )
    assert "torch.optim.SGD" in THIRD_PARTY
    for near in ("torch.optim.sgd.SGD", "torch.optim.lr_scheduler.LambdaLR", "torch.load"):
        with pytest.raises(RefusedTarget, match="not on detkit's allow-list"):
            allowed_target(near)


REFUSED_BY_NAME = [
    "builtins.open",
    "builtins.exec",
    "builtins.eval",
    "builtins.__import__",
    "os.system",
    "posix.system",
    "subprocess.Popen",
    "subprocess.run",
    "importlib.import_module",
    "shutil.rmtree",
    "pathlib.Path.write_text",
    "torch.load",
    "torch.hub.load",
    "torch.save",
    "hydra.utils.instantiate",
    "functools.partial",
    # detkit code that writes files or runs commands is no building part
    "detkit.files.write_text",
    "detkit.files.atomic_path",
    "detkit.cli.main",
    "detkit.engine.run.train",
    "detkit.engine.run.export",
    "detkit.engine.predict.predict_images",
    "detkit.export.export_onnx",
    "detkit.export.onnx.export_onnx",
    "detkit.data.command.run",
    "detkit.data.inspect.browse_grid",
    "detkit.testing.FakeDetector",
]


@pytest.mark.parametrize("name", REFUSED_BY_NAME)
def test_callables_outside_the_list_are_refused(name):
    with pytest.raises(RefusedTarget, match="not on detkit's allow-list"):
        allowed_target(name)


REFUSED_AFTER_LOOKUP = [
    "detkit.data.build_digits",  # in a re-exporting package, but a function that writes files
    "detkit.data.datasets.digits.build_digits",
    "detkit.data.datasets.base.load_rgb",
    "detkit.data.collate",
    "detkit.matching.fit_anchors_from_dataset",
    "detkit.models.torchvision_convert.load_torchvision_ssd_weights",
    "detkit.data.transforms.DetectionTransform.__call__",  # a method, not the class
    "detkit.models.SSD.from_torchvision",
    "detkit.data.datasets.digits.os.system",  # a module imported by a part's module
    "detkit.data.datasets.digits.json.dump",
    "detkit.data.datasets.base.Image.open",
    "detkit.data.transforms.A.Compose",  # albumentations, as the transforms module calls it
    "detkit.models.detectors.ssd.torch.hub.load",
    "detkit.models.detectors.ssd.nn.Module",
    "detkit.data.transforms._plain",
    "detkit.models.NoSuchDetector",
    "detkit.models.no_such_module.Thing",
]


@pytest.mark.parametrize("name", REFUSED_AFTER_LOOKUP)
def test_names_inside_the_part_packages_must_be_parts_defined_there(name):
    with pytest.raises(RefusedTarget, match="building parts|detkit has no"):
        allowed_target(name)


@pytest.mark.parametrize(
    "target", [3, None, ["builtins.open"], {"_target_": "x"}, "", "builtins.open ", "os.system()"]
)
def test_a_target_that_is_not_a_plain_dotted_name_is_refused(target):
    with pytest.raises(RefusedTarget, match="not a plain dotted name"):
        allowed_target(target)


def test_a_refused_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "trojan_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\nrun = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RefusedTarget):
        allowed_target("trojan_mod.run")
    assert "trojan_mod" not in sys.modules
    assert not marker.exists()


def test_the_users_opt_in_comes_from_the_environment(monkeypatch):
    from collections import Counter, OrderedDict

    monkeypatch.delenv("DETKIT_ALLOWED_TARGETS", raising=False)
    with pytest.raises(RefusedTarget, match="DETKIT_ALLOWED_TARGETS"):
        allowed_target("collections.OrderedDict")
    monkeypatch.setenv("DETKIT_ALLOWED_TARGETS", "collections.OrderedDict, detkit.testing.*")
    assert allowed_target("collections.OrderedDict") is OrderedDict
    assert allowed_target("detkit.testing.FakeDetector").__name__ == "FakeDetector"
    with pytest.raises(RefusedTarget):  # exact names stay exact
        allowed_target("collections.Counter")
    monkeypatch.setenv("DETKIT_ALLOWED_TARGETS", "collections.*")
    assert allowed_target("collections.Counter") is Counter
    monkeypatch.setenv("DETKIT_ALLOWED_TARGETS", "coll.*,collections")
    with pytest.raises(RefusedTarget):  # a prefix is a package, not the start of a word
        allowed_target("collections.Counter")


def test_checked_replaces_every_target_by_its_callable():
    config = {
        "model": {
            "_target_": "detkit.models.SSD",
            "backbone": {"_target_": "detkit.models.backbones.SmallBackbone"},
            "_args_": [{"_target_": "detkit.matching.Matcher"}],
            "parts": [[{"_target_": "detkit.matching.SSDMatcher"}]],
        },
        "plain": [1, "two", None],
    }
    out = checked(config, "somewhere")
    assert out["model"]["_target_"] is SSD
    assert out["model"]["backbone"]["_target_"] is detkit.models.backbones.SmallBackbone
    assert out["model"]["_args_"][0]["_target_"] is detkit.matching.Matcher
    assert out["model"]["parts"][0][0]["_target_"] is detkit.matching.SSDMatcher
    assert out["plain"] == [1, "two", None]
    assert config["model"]["_target_"] == "detkit.models.SSD"  # the input is left as it was


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"_target_": "os.system"}, "the top"),
        ({"model": {"backbone": {"_target_": "os.system"}}}, "model.backbone"),
        ({"model": {"_args_": [1, {"_target_": "os.system"}]}}, r"model._args_\[1\]"),
        ({"t": {"eval": [{"ok": [{"_target_": "os.system"}]}]}}, r"t.eval\[0\].ok\[0\]"),
        ({"x": {"_target_": "detkit.matching.Matcher", "y": {"_target_": "os.system"}}}, "x.y"),
    ],
)
def test_a_refusal_is_one_line_naming_the_source_target_and_place(config, where):
    with pytest.raises(RefusedTarget) as caught:
        checked(config, "checkpoint /some/file.ckpt")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("checkpoint /some/file.ckpt: refused _target_ 'os.system' at ")
    assert caught.match(f"at {where}: ")
