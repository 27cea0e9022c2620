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
