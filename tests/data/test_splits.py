"""Building one split of a config's dataset."""

from omegaconf import OmegaConf

from detkit.config import compose_config
from detkit.data.splits import build_split
from detkit.engine.eval_data import replace_data


def test_a_split_is_built_with_the_eval_transforms_of_a_config_without_training_ones(tmp_path):
    """An exported model's config knows only its eval transforms: ``data=`` with a train split
    that names ``${transforms.train}`` still builds that split, with the eval pipeline."""
    exported = OmegaConf.create(
        {"transforms": {"eval": {"_target_": "detkit.data.transforms.ssd_eval", "size": 96}}}
    )
    data = compose_config("eval", ["data=digits", "data.n_train=2", "data.n_val=0"]).data
    paths = {"cache_dir": str(tmp_path)}
    config = replace_data(exported, OmegaConf.to_container(data, resolve=False), paths)
    dataset = build_split(config, "train")
    assert len(dataset) == 2
    assert dataset[0][0].shape == (3, 96, 96)  # digits canvases are 256 x 256
    # The given config is left as it was.
    assert OmegaConf.to_container(config.data.datamodule.train)["transforms"] == (
        "${transforms.train}"
    )
