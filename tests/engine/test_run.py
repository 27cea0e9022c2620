"""The commands end to end on a tiny digits set: train -> eval -> predict, as a user runs them."""

import json

import pytest

from detkit import cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    code = cli.main(
        [
            "train",
            "experiment=digits_ssd",
            "trainer.max_epochs=1",
            f"data.root={tmp / 'digits'}",
            "data.n_train=16",
            "data.n_val=6",
            "data.datamodule.batch_size=8",
            "data.datamodule.num_workers=0",
            "callbacks.progress_bar=null",
            f"hydra.run.dir={tmp / 'train'}",
        ]
    )
    assert code == 0
    return tmp


def test_train_writes_checkpoints_logs_summary_and_evaluation(trained):
    run = trained / "train"
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    assert list((run / "logs").rglob("metrics.csv"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2  # 16 images / batch 8, one epoch
    assert "val/mAP" in summary["val"]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert summary["eval"]["AP"] == metrics["AP"]
    results = json.loads((run / "eval" / "results.json").read_text())
    gt = json.loads((run / "eval" / "ground_truth.json").read_text())
    assert len(gt["images"]) == 6
    assert {r["image_id"] for r in results} <= {image["id"] for image in gt["images"]}


def test_eval_command_reproduces_the_evaluation_after_training(trained):
    out = trained / "eval"
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    assert cli.main(["eval", f"ckpt={ckpt}", f"hydra.run.dir={out}"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((trained / "train" / "eval" / "metrics.json").read_text())
    assert again["stats"] == first["stats"]


def test_eval_of_results_files_through_pycocotools_backend(trained):
    first = trained / "train" / "eval"
    out = trained / "eval_files"
    args = [f"gt={first / 'ground_truth.json'}", f"predictions={first / 'results.json'}"]
    assert cli.main(["eval", *args, "backend=pycocotools", f"hydra.run.dir={out}"]) == 0
    official = json.loads((out / "metrics.json").read_text())
    ours = json.loads((first / "metrics.json").read_text())
    assert official["stats"] == pytest.approx(ours["stats"], abs=1e-12)


def test_predict_draws_images_and_writes_detections_in_file_pixels(trained):
    out = trained / "predict"
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    source = trained / "digits" / "val"
    code = cli.main(
        [
            "predict",
            f"ckpt={ckpt}",
            f"source={source}",
            "score_threshold=0.0",
            f"hydra.run.dir={out}",
        ]
    )
    assert code == 0
    written = json.loads((out / "detections.json").read_text())
    assert len(written) == 6
    for entry in written:
        assert (out / f"{entry['file'].rsplit('/', 1)[-1]}").exists()
        for det in entry["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert -1 <= x1 <= x2 <= 257 and -1 <= y1 <= y2 <= 257


def test_predict_names_a_source_with_no_images(trained, tmp_path, capsys):
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli.main(["predict", f"ckpt={ckpt}", f"source={empty}", f"hydra.run.dir={tmp_path}"])
    assert code == 1
    assert str(empty) in capsys.readouterr().err


@pytest.mark.parametrize(
    "path",
    ["/runs/a/last.ckpt", "/runs/x/last-step=3.ckpt", "/my runs/it's/last.ckpt", "C:\\r\\"]
    + ["a\\'b"],
)
def test_the_resume_command_quotes_paths_as_hydra_reads_them(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from detkit.engine.run import hydra_value

    parsed = OverridesParser.create().parse_override(f"ckpt_path={hydra_value(path)}")
    assert parsed.value() == path
