"""``safe_instantiate`` builds only what the allow-list admits, after resolving (so an
interpolation cannot smuggle a target in); ``config_from_file`` refuses interpolations in a
stored config instead of resolving them."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig, OmegaConf

from detkit.config import compose_config, config_from_file, safe_instantiate
from detkit.errors import UserError
from detkit.matching import Matcher
from detkit.models import SSD

PATHS = ["paths.output_dir=/nonexistent/run", "paths.cache_dir=/nonexistent/cache"]


def test_safe_instantiate_builds_the_packaged_model():
    cfg = compose_config("train", ["experiment=digits_ssd", *PATHS])
    model = safe_instantiate(cfg.model)
    assert isinstance(model, SSD) and model.num_classes == 10


def test_safe_instantiate_keeps_hydras_options():
    node = {"_target_": "detkit.matching.Matcher", "_partial_": True, "high_threshold": 0.6}
    made = safe_instantiate(node)
    assert isinstance(made(low_threshold=0.3), Matcher)
    assert made.keywords == {"high_threshold": 0.6}


def test_a_refused_target_in_a_composed_config_names_its_key(tmp_path):
    marker = tmp_path / "marker"
    evil = f"+model.backbone.extra={{_target_:builtins.open,file:'{marker}',mode:w}}"
    cfg = compose_config("train", ["experiment=digits_ssd", *PATHS, evil])
    with pytest.raises(UserError) as caught:
        safe_instantiate(cfg.model)
    assert str(caught.value) == (
        "the config: refused _target_ 'builtins.open' at model.backbone.extra: it is not on "
        "detkit's allow-list (to allow your own code, set DETKIT_ALLOWED_TARGETS=name,package.*)"
    )
    assert not marker.exists()


def test_a_target_made_by_interpolation_is_checked_after_resolving(tmp_path):
    marker = tmp_path / "marker"
    cfg = OmegaConf.create(
        {"name": "builtins.open", "x": {"_target_": "${name}", "file": str(marker), "mode": "w"}}
    )
    with pytest.raises(UserError, match="refused _target_ 'builtins.open' at x: "):
        safe_instantiate(cfg.x, source="my.yaml")
    made = "${oc.create:'{_target_: builtins.open, file: " + str(marker) + ", mode: w}'}"
    with pytest.raises(UserError, match="refused _target_ 'builtins.open' at x: "):
        safe_instantiate(OmegaConf.create({"x": made}))
    assert not marker.exists()


def test_an_interpolation_left_after_resolving_is_refused(tmp_path):
    # An escaped "\${" resolves to a literal "${", which Hydra's instantiate would resolve again.
    marker = tmp_path / "marker"
    hidden = r"\${oc.create:'{_target_: builtins.open, file: " + str(marker) + ", mode: w}'}"
    node = {"_target_": "detkit.matching.Matcher", "high_threshold": hidden}
    with pytest.raises(UserError, match="holds the interpolation"):
        safe_instantiate(node, source="my.yaml")
    assert not marker.exists()


def test_config_from_file_returns_the_config_when_clean():
    stored = {"model": {"_target_": "detkit.models.SSD", "num_classes": 3}, "names": ["a"]}
    config = config_from_file(stored, "checkpoint c.ckpt")
    assert isinstance(config, DictConfig)
    assert OmegaConf.to_container(config) == stored


@pytest.mark.parametrize(
    ("stored", "where"),
    [
        ({"cache": "${oc.env:HOME}"}, "cache"),
        ({"model": {"size": "${data.size}"}, "data": {"size": 3}}, "model.size"),
        ({"names": ["a", "x${oc.env:USER}"]}, r"names\[1\]"),
        ({"model": {"_target_": "${evil}"}, "evil": "builtins.open"}, "model._target_"),
    ],
)
def test_config_from_file_refuses_interpolations_instead_of_resolving(stored, where):
    with pytest.raises(UserError) as caught:
        config_from_file(stored, "checkpoint c.ckpt")
    assert "\n" not in str(caught.value)
    assert caught.match(f"^checkpoint c.ckpt: {where} holds the interpolation ")


def test_config_from_file_refuses_targets_and_non_mappings():
    with pytest.raises(UserError, match="refused _target_ 'os.system' at model.backbone"):
        config_from_file({"model": {"backbone": {"_target_": "os.system"}}}, "sidecar m.json")
    with pytest.raises(UserError, match="its config is a str, not a mapping"):
        config_from_file("model: {_target_: os.system}", "checkpoint c.ckpt")


def test_train_refuses_a_users_yaml_naming_builtins_before_building_anything(
    tmp_path, capsys, monkeypatch
):
    from detkit import cli

    marker = tmp_path / "marker"
    experiments = tmp_path / "my_configs" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "evil.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n  - override /data: digits\n  - override /model: ssd_digits\n"
        f"logger:\n  evil:\n    _target_: builtins.open\n    file: {marker}\n    mode: w\n"
    )
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config-dir", str(tmp_path / "my_configs"), "experiment=evil"]
    digits = tmp_path / "digits"
    args += [f"data.root={digits}", "data.n_train=16", "data.n_val=6", "hydra.run.dir=run"]
    capsys.readouterr()
    assert cli.main(args) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"detkit: error: the train config (in {experiments / 'evil.yaml'}): refused _target_ "
        "'builtins.open' at logger.evil: it is not on detkit's allow-list (to allow your own "
        "code, set DETKIT_ALLOWED_TARGETS=name,package.*)"
    ]
    assert not marker.exists()
    assert not digits.exists()  # refused before the dataset was built


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.head.foo=3", r"SSDHead.*unexpected keyword argument 'foo'.*full_key: head"),
        ("model.num_classes=ten", r"SSDHead.*TypeError.*full_key: head"),
    ],
)
def test_a_wrong_key_or_type_is_one_line_naming_the_target_and_key(override, message):
    cfg = compose_config("train", ["experiment=digits_ssd", override])
    with pytest.raises(UserError, match=message) as caught:
        safe_instantiate(cfg.model)
    assert "\n" not in str(caught.value)
