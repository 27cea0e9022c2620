"""The installed wheel works on its own: configs inside the package, users' configs outside it.

The wheel is built from this checkout and installed without dependencies into a fresh virtual
environment whose only other path is this environment's site-packages (for torch & co.); the
editable checkout is not importable there, and the commands run from a temporary directory.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINE = """# @package _global_
defaults:
  - override /data: digits
  - override /model: ssd_digits
task_name: mine
trainer:
  max_epochs: 4
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "dist"), "-q"],
        check=True,
    )  # fmt: skip
    wheel = next((tmp / "dist").glob("detkit-*.whl"))
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # Dependencies come from this environment; a plain path line does not run its .pth files,
    # so the editable checkout's import hook stays out.
    deps = sysconfig.get_paths()["purelib"]
    Path(purelib, "deps.pth").write_text(deps + "\n" + "\n".join(site.getsitepackages()) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--ignore-installed", str(wheel), "-q"],
        check=True, env=_clean_env(),
    )  # fmt: skip
    return wheel, python, Path(purelib), tmp


def _run(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python.parent / "detkit"), *args],
        cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _clean_env() -> dict[str, str]:
    """No checkout on the path, no user config folders: the installed package alone."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DETKIT_CONFIG_PATH")}


def test_wheel_ships_the_configs(installed):
    wheel, *_ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "detkit/configs/train.yaml" in names
    assert "detkit/configs/experiment/digits_ssd.yaml" in names
    assert "detkit/configs/model/backbone/vgg16.yaml" in names


def test_installed_detkit_is_not_the_checkout(installed):
    _, python, purelib, tmp = installed
    out = subprocess.run(
        [str(python), "-c", "import detkit; print(detkit.__file__)"],
        cwd=tmp, env=_clean_env(), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert Path(out.strip()).is_relative_to(purelib)


def test_installed_train_composes_a_packaged_experiment(installed):
    _, python, _, tmp = installed
    done = _run(python, tmp, "train", "experiment=digits_ssd", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert "task_name: digits_ssd" in done.stdout
    assert "_target_: detkit.models.SSD" in done.stdout


def test_users_own_experiment_from_config_dir_and_from_cwd(installed, tmp_path):
    _, python, _, _ = installed
    mine = tmp_path / "my_configs" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(MINE)
    done = _run(python, tmp_path, "train", "--config-dir", str(tmp_path / "my_configs"),
                "experiment=mine", "--cfg", "job")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "task_name: mine" in done.stdout and "max_epochs: 4" in done.stdout
    # The same file in ./configs of the working directory is found without a flag.
    (tmp_path / "my_configs").rename(tmp_path / "configs")
    done = _run(python, tmp_path, "train", "experiment=mine", "--cfg", "job")
    assert done.returncode == 0, done.stderr
    assert "task_name: mine" in done.stdout
