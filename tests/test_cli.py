import pytest

from detkit import cli


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: detkit" in capsys.readouterr().out


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "predict", "export", "data"):
        assert f"  {command}" in out


def test_unknown_command_is_named(capsys):
    assert cli.main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["train", "--foo"], "unrecognized arguments: --foo"),
        (["eval", "--cfg", "bogus"], "argument --cfg/-c: invalid choice: 'bogus'"),
        (
            ["train", "hydra.run.dir=x", "--config-dir", ".", "experiment=mine"],
            "unrecognized arguments: experiment=mine (options go before the key=value overrides",
        ),
    ],
)
def test_unknown_or_malformed_options_are_one_line(capsys, argv, named):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "usage" not in captured.err
    assert f"detkit {argv[0]} --help" in lines[0]


def test_eval_without_inputs_says_what_is_missing(capsys, tmp_path):
    code = cli.main(["eval", f"hydra.run.dir={tmp_path}"])
    assert code == 1
    assert "ckpt=<checkpoint>" in capsys.readouterr().err


def test_eval_of_missing_checkpoint_names_the_file(capsys, tmp_path):
    missing = tmp_path / "nope.ckpt"
    code = cli.main(["eval", f"ckpt={missing}", f"hydra.run.dir={tmp_path}"])
    assert code == 1
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "predict", "export", "data"])
def test_every_command_composes_its_config(command, capsys):
    assert cli.main([command, "--cfg", "job"]) == 0
    assert capsys.readouterr().out.strip()


_HYDRA_NODES = {
    "callback": "hydra:\n  callbacks:\n    x:\n      _target_: shutil.copyfile\n"
    "      src: {src}\n      dst: {marker}\n",
    "env_set": "hydra:\n  job:\n    env_set:\n      DETKIT_ALLOWED_TARGETS: 'shutil.*'\n",
    "env_set_preload": "hydra:\n  job:\n    env_set:\n      LD_PRELOAD: /tmp/x.so\n",
    "logging_factory": "hydra:\n  job_logging:\n    handlers:\n      console:\n"
    "        '()': shutil.copyfile\n        src: {src}\n        dst: {marker}\n",
    "logging_class": "hydra:\n  hydra_logging:\n    handlers:\n      console:\n"
    "        class: shutil.copyfile\n",
    "logging_external": "hydra:\n  job_logging:\n    handlers:\n      console:\n"
    "        stream: ext://os.system\n",
    "launcher": "hydra:\n  launcher:\n    _target_: shutil.copyfile\n",
}


@pytest.mark.parametrize("name", sorted(_HYDRA_NODES))
def test_hydra_settings_that_run_code_are_refused_before_hydra_applies_them(
    name, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    marker, src = tmp_path / "RAN", tmp_path / "src.txt"
    src.write_text("x")
    (tmp_path / "mine" / "experiment").mkdir(parents=True)
    text = "# @package _global_\n" + _HYDRA_NODES[name].format(src=src, marker=marker)
    (tmp_path / "mine" / "experiment" / "evil.yaml").write_text(text)
    args = ["train", "--config-dir", str(tmp_path / "mine"), "experiment=evil"]
    assert cli.main([*args, f"hydra.run.dir={tmp_path}/run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("detkit: error: the hydra: settings: refused") and err.count("\n") == 1
    assert not marker.exists()


def test_hydra_settings_a_config_may_use(tmp_path, capsys):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "threads.yaml").write_text(
        "# @package _global_\nhydra:\n  job:\n    env_set:\n      OMP_NUM_THREADS: '1'\n"
    )
    args = ["train", "--config-dir", str(tmp_path), "experiment=threads", "--cfg", "hydra"]
    assert cli.main(args) == 0
    assert "OMP_NUM_THREADS" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x: !!python/object:os.system 'true'\n", "could not determine a constructor"),
        ("x: [1, 2\n", "while parsing a flow sequence"),
    ],
)
def test_yaml_errors_are_one_line(text, message, tmp_path, capsys):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "bad.yaml").write_text("# @package _global_\n" + text)
    assert cli.main(["train", "--config-dir", str(tmp_path), "experiment=bad"]) == 1
    err = capsys.readouterr().err
    assert message in err and "bad.yaml" in err and err.count("\n") == 1


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = ["data", "stats", f"hydra.run.dir={blocker / 'run'}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err == (
        f"detkit: error: hydra.run.dir {blocker / 'run'}: cannot write in {blocker}: "
        f"{blocker} is not a directory\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing left behind


@pytest.mark.parametrize("source", ["config-dir", "command line"])
def test_a_refused_target_names_the_file_or_override_it_came_from(source, tmp_path, capsys):
    """Hydra composes the user's YAML before detkit sees it; the refusal still names it."""
    args = ["train"]
    if source == "config-dir":
        (tmp_path / "experiment").mkdir()
        mine = tmp_path / "experiment" / "mine.yaml"
        mine.write_text("# @package _global_\nmodel:\n  backbone:\n    _target_: os.system\n")
        args += ["--config-dir", str(tmp_path), "experiment=mine"]
        origin = f"(in {mine})"
    else:
        args += ["model.backbone._target_=os.system"]
        origin = "(from the command line: model.backbone._target_=os.system)"
    assert cli.main([*args, f"hydra.run.dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"the train config {origin}: refused _target_ 'os.system' at model.backbone" in err
