import json

import pytest
from rich.console import Console

from detkit.errors import UserError
from detkit.eval import evaluate_coco, evaluate_voc
from detkit.eval.command import run
from detkit.eval.report import print_table


@pytest.mark.parametrize("protocol", ["coco", "voc07", "voc12"])
def test_run_writes_metrics_and_plots(tmp_path, coco_case, protocol, capsys):
    gt, dets = coco_case(7)
    gt_file, dt_file = tmp_path / "gt.json", tmp_path / "results.json"
    gt_file.write_text(json.dumps(gt))
    dt_file.write_text(json.dumps(dets))
    out = tmp_path / "out"
    plots = protocol == "coco"  # plotting is the slow part: draw once
    result = run(gt_file, dt_file, protocol=protocol, output_dir=out, plots=plots)
    printed = capsys.readouterr().out
    assert "Per class" in printed and "class0" in printed
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("pr_curves.png", "f1_curves.png", "confusion_matrix.png"):
        assert (out / name).exists() == plots
        assert not plots or (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if protocol == "coco":
        assert saved["stats"] == evaluate_coco(gt, dets)["stats"]
        assert saved["AP"] == result["AP"]
    else:
        method = "11point" if protocol == "voc07" else "area"
        assert saved["mAP"] == pytest.approx(evaluate_voc(gt, dets, method=method)["mAP"])
    matrix = saved["confusion_matrix"]["matrix"]
    assert len(matrix) == len(gt["categories"]) + 1
    # every non-crowd gt is either matched or missed exactly once
    num_gt = sum(1 for a in gt["annotations"] if not a["iscrowd"])
    assert sum(sum(row) for row in matrix[:-1]) == num_gt
    assert set(saved["best_f1"]) == {c["name"] for c in gt["categories"]}


def test_run_rejects_unknown_protocol(coco_case):
    gt, dets = coco_case(1)
    with pytest.raises(ValueError, match="protocol must be one of"):
        run(gt, dets, protocol="voc2012")


def test_print_table_for_metric_dict():
    console = Console(record=True, width=100)
    print_table({"map": 0.5, "map_50": -1.0, "per_class": {0: 0.25, 1: -1.0}}, ["a", "b"], console)
    text = console.export_text()
    assert "map_50" in text and "0.5000" in text and "0.2500" in text
    assert "a " in text and "b " in text


@pytest.mark.parametrize("protocol", ["voc07", "voc12"])
@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_run_refuses_a_reference_backend_for_voc_protocols(tmp_path, coco_case, protocol, backend):
    # Neither tool has VOC AP: taking backend= and answering with detkit's VOC would ignore it.
    gt, dets = coco_case(1)
    with pytest.raises(UserError, match=f"backend={backend} computes the COCO protocol only"):
        run(gt, dets, protocol=protocol, backend=backend, output_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_run_with_pycocotools_backend_reports_its_numbers(tmp_path, coco_case, reference_eval):
    gt, dets = coco_case(3)
    result = run(gt, dets, backend="pycocotools", output_dir=tmp_path, quiet=True)
    assert result["backend"] == "pycocotools"
    assert result["stats"] == [float(s) for s in reference_eval(gt, dets).stats]
    with pytest.raises(UserError, match="backend must be one of"):
        run(gt, dets, backend="cocoapi", output_dir=tmp_path)
    # Every file is complete under its name: no temporary left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "confusion_matrix.png", "f1_curves.png", "metrics.json", "pr_curves.png",
    ]  # fmt: skip


def _negatives_only():
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "cat"}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9}]
    return gt, dets


@pytest.mark.parametrize("protocol", ["coco", "voc07", "voc12"])
def test_ground_truth_without_annotations(tmp_path, protocol, reference_eval):
    gt, dets = _negatives_only()
    result = run(gt, dets, protocol=protocol, output_dir=tmp_path, plots=False, quiet=True)
    if protocol == "coco":
        assert result["stats"] == list(reference_eval(gt, dets).stats) == [-1.0] * 12
    assert result["confusion_matrix"]["matrix"].tolist() == [[0, 0], [1, 0]]  # one false alarm


@pytest.mark.parametrize("protocol", ["voc07", "voc12"])
def test_voc_extras_ignore_difficult_objects_like_the_map(tmp_path, protocol):
    box = {"iscrowd": 0, "area": 100, "category_id": 1, "image_id": 1}
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "dog"}],
        "annotations": [
            dict(box, id=1, bbox=[0, 0, 10, 10]),
            dict(box, id=2, bbox=[50, 50, 10, 10], difficult=1),  # found by nothing
            dict(box, id=3, bbox=[80, 80, 10, 10], difficult=1),  # found: neither TP nor FP
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [80, 80, 10, 10], "score": 0.8},
    ]
    result = run(gt, dets, protocol=protocol, output_dir=tmp_path, plots=False, quiet=True)
    assert result["mAP"] == pytest.approx(1.0)
    at = result["at_score_threshold"]["per_class"]["dog"]
    assert (at["precision"], at["recall"]) == (1.0, 1.0)
    assert result["best_f1"]["dog"]["f1"] == 1.0
    assert result["confusion_matrix"]["matrix"].tolist() == [[1, 0], [0, 0]]
    coco = run(gt, dets, protocol="coco", output_dir=tmp_path, plots=False, quiet=True)
    assert coco["at_score_threshold"]["per_class"]["dog"]["recall"] == pytest.approx(2 / 3)
