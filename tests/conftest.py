"""Test-wide settings. Triton reads TRITON_INTERPRET when it is first imported, so the kernels
run on CPU tensors only if this is set before anything imports detkit."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Small tensors on a shared 2-core machine: extra intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hostile_nodes(marker) -> dict[str, dict]:
    """Config nodes that create ``marker`` when Hydra instantiates them, as a crafted
    checkpoint or sidecar would hide them: builtins, os/posix/subprocess, and detkit
    functions that write files (not building parts). Hydra's own blocklist stops some of
    them (os.system, exec, subprocess), not ``builtins.open``, ``pathlib.Path.touch`` or
    detkit's own functions."""
    marker = str(marker)
    return {
        "builtins.open": {"_target_": "builtins.open", "file": marker, "mode": "w"},
        "os.system": {"_target_": "os.system", "_args_": [f"touch '{marker}'"]},
        "posix.system": {"_target_": "posix.system", "_args_": [f"touch '{marker}'"]},
        "subprocess.check_call": {"_target_": "subprocess.check_call", "args": ["touch", marker]},
        "builtins.exec": {"_target_": "builtins.exec", "_args_": [f"open({marker!r}, 'w')"]},
        "pathlib.Path.touch": {"_target_": "pathlib.Path.touch", "_args_": [marker]},
        "detkit.files.write_text": {
            "_target_": "detkit.files.write_text",
            "path": marker,
            "text": "written",
        },
        "detkit.data.build_digits": {
            "_target_": "detkit.data.build_digits",
            "out_dir": marker,
            "n_train": 0,
            "n_val": 0,
        },
    }


def plant(config: dict, where: str, node: dict) -> dict:
    """``config`` with ``node`` hidden at ``where``, one of the places Hydra instantiates:
    ``model`` (as the backbone), ``list`` (inside a list argument), ``args`` (in ``_args_``),
    ``interpolation`` (the target spelled ``${evil}``), ``transforms`` (the eval transforms),
    ``data`` (the val dataset)."""
    model = config["model"]
    if where == "model":
        model["backbone"] = node
    elif where == "list":
        model["backbone"]["layers"] = [1, {"nested": [node]}]
    elif where == "args":
        model["_args_"] = [node]
    elif where == "interpolation":
        config["evil"] = node["_target_"]
        model["backbone"] = {**node, "_target_": "${evil}"}
    elif where == "transforms":
        config["transforms"]["eval"] = node
    elif where == "data":
        config["data"]["datamodule"]["val"] = node
    else:
        raise ValueError(where)
    return config


@pytest.fixture(scope="session")
def hostile():
    """:func:`hostile_nodes`, for the tests in every folder."""
    return hostile_nodes


@pytest.fixture(scope="session")
def digits_ssd_checkpoint():
    """``(config, state_dict)`` of a genuine digits SSD checkpoint (random weights): the resolved
    ``experiment=digits_ssd`` config, as ``detkit train`` stores it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from detkit.config import compose_config

    overrides = ["experiment=digits_ssd", "paths.output_dir=/nonexistent/run"]
    cfg = compose_config("train", [*overrides, "paths.cache_dir=/nonexistent/cache"])
    state = {f"model.{k}": v for k, v in instantiate(cfg.model).state_dict().items()}
    return OmegaConf.to_container(cfg, resolve=True), state


@pytest.fixture
def write_checkpoint(digits_ssd_checkpoint, tmp_path):
    """``write_checkpoint(name, where=None, node=None)``: the genuine checkpoint, or one with
    ``node`` planted at ``where`` (see :func:`plant`), saved as ``tmp_path/name``."""
    import copy

    def write(name: str, where: str | None = None, node: dict | None = None):
        config, state = copy.deepcopy(digits_ssd_checkpoint)
        if where is not None:
            config = plant(config, where, node)
        path = tmp_path / name
        torch.save({"state_dict": state, "detkit_config": config}, path)
        return path

    return write
