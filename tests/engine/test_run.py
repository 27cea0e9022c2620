"""The commands end to end on a tiny digits set: train -> eval -> predict, as a user runs them."""

import contextlib
import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

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


def test_predict_folds_batchnorm_unless_told_not_to(trained, tmp_path, monkeypatch):
    from detkit.engine import inference
    from detkit.eval.compare import compare_detections
    from detkit.testing import detections_from_json

    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    source = trained / "digits" / "val"
    folded_counts = []
    fold = inference.fuse_for_inference
    monkeypatch.setattr(
        inference, "fuse_for_inference", lambda model: folded_counts.append(fold(model)[0])
    )
    runs = {}
    for name, extra in (("folded", []), ("plain", ["fuse_conv_bn=false"])):
        args = [f"ckpt={ckpt}", f"source={source}", "score_threshold=0.05", *extra]
        assert cli.main(["predict", *args, f"hydra.run.dir={tmp_path / name}"]) == 0
        runs[name] = json.loads((tmp_path / name / "detections.json").read_text())
    plain_model = inference.load_inference_model(ckpt)[0]
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain_model.modules())
    assert folded_counts == [batch_norms] and batch_norms > 0  # all of them, default run only
    for folded, plain in zip(runs["folded"], runs["plain"], strict=True):
        dets = [detections_from_json(r["detections"]) for r in (plain, folded)]
        result = compare_detections([dets[0]], [dets[1]], score_tolerance=1e-4)
        assert result.unmatched == 0 and result.max_box_diff < 1e-2


def test_predict_names_a_fuse_conv_bn_that_is_not_true_or_false(trained, tmp_path, capsys):
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    args = [f"ckpt={ckpt}", f"source={trained / 'digits' / 'val'}", "fuse_conv_bn=no"]
    assert cli.main(["predict", *args, f"hydra.run.dir={tmp_path}"]) != 0
    err = capsys.readouterr().err
    assert "fuse_conv_bn must be true or false, got 'no'" in err
    assert "Traceback" not in err


def test_predict_names_a_source_with_no_images(trained, tmp_path, capsys):
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli.main(["predict", f"ckpt={ckpt}", f"source={empty}", f"hydra.run.dir={tmp_path}"])
    assert code == 1
    assert str(empty) in capsys.readouterr().err


# ----- evaluating a checkpoint on another dataset: the official numbers -----------------------
STATS_BY_AREA = [3, 4, 5, 9, 10, 11]  # APs APm APl ARs ARm ARl: the stats that read "area"


def _pycocotools(gt, results) -> list[float]:
    """The 12 stats of pycocotools' own COCO + loadRes + COCOeval (the oracle)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, dict):
            coco_gt = COCO()
            coco_gt.dataset = copy.deepcopy(gt)
            coco_gt.createIndex()
        else:
            coco_gt = COCO(str(gt))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(results)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def _annotation(anns: list, image_id: int, category_id: int, bbox: list, area: float, **flags):
    anns.append(
        {
            "id": 10 * len(anns) + 3,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": [float(v) for v in bbox],
            "area": float(area),
            "iscrowd": 0,
            **flags,
        }
    )


@pytest.fixture(scope="module")
def crafted(trained):
    """A COCO file over the digits val images that ``to_coco()`` would not reproduce: areas
    that are not w*h (across the small/medium/large limits), crowd regions, sub-pixel boxes,
    a box partly outside its image, an ``ignore`` flag, an image without objects, image ids
    unlike the digits set's. Its objects sit near the checkpoint's own detections (moved by
    up to ~12%), so the stats are not zero however little the 2-step model learnt."""
    digits = json.loads((trained / "digits" / "val.json").read_text())
    results = json.loads((trained / "train" / "eval" / "results.json").read_text())
    rng = np.random.default_rng(0)
    data = {"images": [], "annotations": [], "categories": digits["categories"]}
    anns = data["annotations"]
    for k, image in enumerate(digits["images"]):
        image_id = 1000 + 7 * k
        data["images"].append({**image, "id": image_id})
        if k == len(digits["images"]) - 1:
            continue  # a negative image
        dets = [r for r in results if r["image_id"] == image["id"]]
        dets.sort(key=lambda r: -r["score"])
        for det in dets[:5]:
            x, y, w, h = det["bbox"]
            shift = rng.uniform(-0.12, 0.12, 2) * (w, h) + (0.37, -0.21)
            box = [
                x + shift[0],
                y + shift[1],
                w * rng.uniform(0.85, 1.15),
                h * rng.uniform(0.85, 1.15),
            ]
            area = box[2] * box[3] * rng.choice([0.1, 0.4, 3.0, 8.0])
            _annotation(anns, image_id, det["category_id"], box, area)
        x1, y1 = (min(d["bbox"][i] for d in dets[5:9]) for i in (0, 1))
        x2 = max(d["bbox"][0] + d["bbox"][2] for d in dets[5:9])
        y2 = max(d["bbox"][1] + d["bbox"][3] for d in dets[5:9])
        crowd_area = 0.4 * (x2 - x1) * (y2 - y1)
        _annotation(
            anns,
            image_id,
            dets[5]["category_id"],
            [x1, y1, x2 - x1, y2 - y1],
            crowd_area,
            iscrowd=1,
        )
    first = data["images"][0]["id"]
    _annotation(anns, first, 4, [12.3, 40.7, 0.6, 0.45], 0.2)  # sub-pixel
    _annotation(anns, first, 5, [-6.5, 200.25, 30.5, 70.0], 1500.0)  # partly outside
    _annotation(anns, first, 6, [230.75, 3.5, 40.0, 20.0], 700.0)  # over the right edge
    anns[2]["ignore"] = 1
    path = trained / "crafted.json"
    path.write_text(json.dumps(data))
    return path, data


def _eval_on_file(trained, ann_file, out, *extra):
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    data = [
        "data=coco",
        f"data.val_images={trained / 'digits' / 'val'}",
        f"data.val_ann={ann_file}",
    ]
    return cli.main(["eval", f"ckpt={ckpt}", *data, *extra, f"hydra.run.dir={out}"])


@pytest.mark.filterwarnings("ignore:.*clipped")
def test_eval_on_a_coco_file_gives_pycocotools_numbers_on_that_file(trained, crafted):
    path, data = crafted
    out = trained / "eval_crafted"
    assert _eval_on_file(trained, path, out) == 0
    ours = json.loads((out / "metrics.json").read_text())["stats"]
    official = _pycocotools(path, out / "results.json")
    np.testing.assert_allclose(ours, official, rtol=0, atol=1e-12)
    assert official[0] > 0 and official[1] > 0  # AP, AP50: the comparison is not of zeros
    # The file is scored as written: with w*h areas (what to_coco() writes) the size
    # stats would differ.
    boxed = copy.deepcopy(data)
    for ann in boxed["annotations"]:
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    by_box = _pycocotools(boxed, out / "results.json")
    assert max(abs(official[i] - by_box[i]) for i in STATS_BY_AREA) > 1e-3
    assert json.loads((out / "ground_truth.json").read_text()) == data


@pytest.mark.filterwarnings("ignore:.*clipped")
def test_eval_maps_labels_by_class_name_when_the_file_orders_classes_otherwise(trained, crafted):
    path, data = crafted
    # The same classes under other ids: sorted by id, "9" comes first and "0" last.
    shuffled = copy.deepcopy(data)
    new_id = {c["id"]: 100 - c["id"] for c in data["categories"]}
    for entry in (*shuffled["categories"], *shuffled["annotations"]):
        key = "id" if "name" in entry else "category_id"
        entry[key] = new_id[entry[key]]
    other = trained / "crafted_shuffled.json"
    other.write_text(json.dumps(shuffled))
    out = trained / "eval_shuffled"
    assert _eval_on_file(trained, other, out) == 0
    ours = json.loads((out / "metrics.json").read_text())["stats"]
    np.testing.assert_allclose(ours, _pycocotools(other, out / "results.json"), atol=1e-12)
    np.testing.assert_allclose(
        ours, _pycocotools(path, trained / "eval_crafted" / "results.json"), atol=1e-12
    )


def test_eval_refuses_a_dataset_with_other_classes_in_one_line(trained, crafted, capsys):
    _, data = crafted
    renamed = copy.deepcopy(data)
    for cat in renamed["categories"]:
        cat["name"] = f"digit {cat['name']}"
    other = trained / "crafted_renamed.json"
    other.write_text(json.dumps(renamed))
    assert _eval_on_file(trained, other, trained / "eval_renamed") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "classes" in err and str(other) in err and "'digit 0'" in err


def _voc_devkit(trained, root):
    """The digits val set written as a VOC devkit (PNG images, 1-based inclusive corners)."""
    digits = json.loads((trained / "digits" / "val.json").read_text())
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    names = []
    for image in digits["images"]:
        stem = image["file_name"].rsplit(".", 1)[0]
        names.append(stem)
        shutil.copy(trained / "digits" / "val" / image["file_name"], root / "JPEGImages")
        objects = "".join(
            f"<object><name>{int(a['category_id']) - 1}</name><difficult>0</difficult><bndbox>"
            f"<xmin>{a['bbox'][0] + 1}</xmin><ymin>{a['bbox'][1] + 1}</ymin>"
            f"<xmax>{a['bbox'][0] + a['bbox'][2]}</xmax><ymax>{a['bbox'][1] + a['bbox'][3]}</ymax>"
            "</bndbox></object>"
            for a in digits["annotations"]
            if a["image_id"] == image["id"]
        )
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{image['file_name']}</filename><size><width>256</width>"
            f"<height>256</height><depth>3</depth></size>{objects}</annotation>"
        )
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(names) + "\n")
    return digits


def test_eval_on_a_voc_devkit_replaces_the_checkpoints_data(trained, capsys):
    devkit = trained / "VOCdevkit"
    digits = _voc_devkit(trained, devkit / "VOC2007")
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    voc = ["data=voc", f"data.root={devkit}", "data.val_split=val"]
    names = "data.class_names=[" + ",".join(f"'{d}'" for d in range(10)) + "]"
    out = trained / "eval_voc"
    args = ["eval", f"ckpt={ckpt}", *voc, names, "protocol=voc07", f"hydra.run.dir={out}"]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "voc07" and 0 <= metrics["mAP"] <= 1
    gt = json.loads((out / "ground_truth.json").read_text())
    assert len(gt["images"]) == len(digits["images"])
    assert len(gt["annotations"]) == len(digits["annotations"])
    # With VOC's own 20 classes the model's 10 do not fit: one line says so.
    args = ["eval", f"ckpt={ckpt}", *voc, f"hydra.run.dir={out}_20"]
    assert cli.main(args) == 1
    assert "unknown class name" in capsys.readouterr().err


def test_eval_of_a_checkpoint_honours_backend_pycocotools(trained):
    out = trained / "eval_backend"
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    assert cli.main(["eval", f"ckpt={ckpt}", "backend=pycocotools", f"hydra.run.dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "pycocotools"
    official = _pycocotools(out / "ground_truth.json", out / "results.json")
    assert metrics["stats"] == official


@pytest.mark.parametrize("protocol", ["voc07", "voc12"])
def test_eval_refuses_pycocotools_for_voc_protocols(trained, protocol, capsys):
    ckpt = trained / "train" / "checkpoints" / "best.ckpt"
    out = trained / f"eval_refused_{protocol}"
    args = ["eval", f"ckpt={ckpt}", f"protocol={protocol}", "backend=pycocotools"]
    assert cli.main([*args, f"hydra.run.dir={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "backend=pycocotools" in err and protocol in err
    assert not (out / "results.json").exists()  # refused before the model ran


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


def test_torch_threads_sets_the_training_threads_and_refuses_nonsense():
    from detkit.engine.run import set_threads
    from detkit.errors import UserError

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)  # torch's default: left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="torch_threads"):
        set_threads(0)


def test_train_refuses_a_class_count_that_is_not_the_datas_before_any_step(
    trained, tmp_path, capsys
):
    args = [
        "train",
        "experiment=digits_ssd",
        "data=coco",  # the digits set's COCO files: 10 categories, but COCO's default of 80
        f"data.train_images={trained / 'digits' / 'train'}",
        f"data.train_ann={trained / 'digits' / 'train.json'}",
        f"data.val_images={trained / 'digits' / 'val'}",
        f"data.val_ann={trained / 'digits' / 'val.json'}",
        "data.datamodule.num_workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "detkit: error: the model predicts 80 classes (data.num_classes) but the training data "
        "has 10 (0, 1, 2, 3, 4, 5, 6, 7, ...): set data.num_classes=10"
    ]
    assert not (tmp_path / "run" / "checkpoints").exists()
