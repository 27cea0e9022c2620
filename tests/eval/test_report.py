"""The evaluation report's files survive a kill in the middle of writing them."""

import json

from detkit.eval.report import write_report
from detkit.testing import killed_half_way


def test_metrics_json_killed_half_way_keeps_the_previous_file(tmp_path):
    write_report({"AP": 0.5, "per_class": {}}, tmp_path)
    bigger = {"AP": 0.75, "per_class": {str(k): {"AP": k / 1000} for k in range(20_000)}}
    assert killed_half_way(lambda: write_report(bigger, tmp_path), file_size_limit=100_000)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"AP": 0.5, "per_class": {}}
