"""Human-readable output of an evaluation: a rich table, ``metrics.json`` and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from detkit.files import write_json


def _fmt(value: Any) -> str:
    return "-" if value is None or value == -1 else f"{value:.4f}"


def _name(key: Any, class_names: list[str] | None) -> str:
    if class_names is not None and isinstance(key, int) and 0 <= key < len(class_names):
        return class_names[key]
    return str(key)


def print_table(
    metrics: dict, class_names: list[str] | None = None, console: Console | None = None
) -> None:
    """Print overall numbers (every top-level float) and per-class AP / best F1.

    ``metrics`` is a result of ``evaluate_coco``/``evaluate_voc``/``command.run`` or the
    flat dict of ``DetectionMetric.compute()``; ``class_names`` maps integer class keys.
    """
    console = console or Console()
    overall = Table(title="Overall", show_header=True)
    overall.add_column("metric")
    overall.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            overall.add_row(key, _fmt(value))
    console.print(overall)
    per_class = metrics.get("per_class") or {}
    if not per_class:
        return
    best = metrics.get("best_f1") or {}
    table = Table(title="Per class", show_header=True)
    for column in ("class", "AP", "best F1", "at score"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for key, ap in per_class.items():
        f1 = best.get(key, {})
        table.add_row(_name(key, class_names), _fmt(ap), _fmt(f1.get("f1")),
                      _fmt(f1.get("threshold")))  # fmt: skip
    console.print(table)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_report(
    metrics: dict,
    out_dir: str | Path,
    class_names: list[str] | None = None,
    curves: list[dict] | None = None,
    pr: tuple[np.ndarray, np.ndarray] | None = None,
    confusion: np.ndarray | None = None,
) -> list[Path]:
    """Write ``metrics.json`` and, when given, ``pr_curves.png`` (``pr`` = recall points,
    precision ``[R, K]``), ``f1_curves.png`` (``curves`` from ``class_curves``) and
    ``confusion_matrix.png``. Returns the paths written."""
    from detkit.eval import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.json"
    serialisable = {k: v for k, v in metrics.items() if k not in ("match", "precision")}
    write_json(path, _plain(serialisable), indent=2)
    written = [path]
    if curves is not None:
        count = len(curves)
    elif pr is not None:
        count = pr[1].shape[1]
    else:
        count = 0 if confusion is None else len(confusion) - 1
    names = class_names or [str(k) for k in range(max(count, 0))]
    if pr is not None:
        written.append(plots.plot_pr_curves(pr[0], pr[1], names, out / "pr_curves.png"))
    if curves is not None:
        written.append(plots.plot_f1_curves(curves, names, out / "f1_curves.png"))
    if confusion is not None:
        written.append(plots.plot_confusion_matrix(confusion, names, out / "confusion_matrix.png"))
    return written
