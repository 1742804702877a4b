"""The run directory: what a run leaves behind, and how it is read back.

    config.json           the resolved config (what the run really used)
    metrics.jsonl         one JSON object per evaluation (``metrics.jsonl.partial`` while the run is going)
    summary.json          written last: a directory without it is an unfinished run

Every file is written atomically (a temporary file, then ``os.replace``): readers see all or nothing.
"""
import json
import math
import os
from pathlib import Path

CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
PARTIAL = METRICS + ".partial"


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    with open(Path(run_dir) / METRICS) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_finished(run_dir) -> bool:
    return (Path(run_dir) / SUMMARY).exists()


def reached(row: dict, threshold: float) -> bool:
    return row["val_acc"] is not None and row["val_acc"] >= threshold


def first_row(metrics: list[dict], threshold: float):
    """The first evaluation with ``val_acc >= threshold``, or None. A target crossed between two evaluations
    is reported at the first evaluation that sees it."""
    return next((row for row in metrics if reached(row, threshold)), None)


def sustained_row(metrics: list[dict], threshold: float):
    """The first evaluation from which ``val_acc`` stays ``>= threshold`` to the end, or None when the last
    one is below."""
    first = None
    for row in reversed(metrics):
        if not reached(row, threshold):
            break
        first = row
    return first


def when(row) -> tuple:
    """``(epoch, step, seconds)`` of a metrics row (``elapsed_s``: wall seconds since the run started), or
    ``(None, None, None)`` for no row."""
    return (None, None, None) if row is None else (row["epoch"], row["step"], row.get("elapsed_s"))


def first_reaching(metrics: list[dict], threshold: float) -> tuple:
    """``(epoch, step)`` of the first evaluation with ``val_acc >= threshold``, or ``(None, None)``."""
    return when(first_row(metrics, threshold))[:2]


def sustained_reaching(metrics: list[dict], threshold: float) -> tuple:
    """``(epoch, step)`` of the first evaluation from which ``val_acc`` stays ``>= threshold`` to the end, or
    ``(None, None)`` when the last one is below."""
    return when(sustained_row(metrics, threshold))[:2]


def finite_row(row: dict) -> dict:
    """``row`` with every non-finite number as None: JSON has no NaN or Infinity."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def parse_row(line: str) -> dict:
    """One line of ``metrics.jsonl``; ValueError when it is not a whole JSON object (a line cut by a kill)."""
    row = json.loads(line)
    if not isinstance(row, dict):
        raise ValueError(f"not a metrics row: {line[:40]!r}")
    return row


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl.partial``, after ``rows`` already written (a resumed run);
    ``finish`` renames it to ``metrics.jsonl``."""

    def __init__(self, run_dir: Path, rows=()):
        self.run_dir = Path(run_dir)
        tmp = self.run_dir / (PARTIAL + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(tmp, self.run_dir / PARTIAL)
        (self.run_dir / METRICS).unlink(missing_ok=True)
        self.file = open(self.run_dir / PARTIAL, "a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()
        os.replace(self.run_dir / PARTIAL, self.run_dir / METRICS)
