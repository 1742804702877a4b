"""The run directory: what a run leaves behind, and how it is read back.

    config.json           the resolved config (what the run really used)
    metrics.jsonl         one JSON object per evaluation (``metrics.jsonl.partial`` while the run is going)
    summary.json          written last: a directory without it is an unfinished run

Every file is written atomically (a temporary file, then ``os.replace``): readers see all or nothing.
"""
import json
import os
from pathlib import Path
from typing import Optional

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


def first_reaching(metrics: list[dict], threshold: float) -> tuple[Optional[int], Optional[int]]:
    """``(epoch, step)`` of the first evaluation with ``val_acc >= threshold``, or ``(None, None)``."""
    for row in metrics:
        if row["val_acc"] >= threshold:
            return row["epoch"], row["step"]
    return None, None


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl.partial``; ``finish`` renames it to ``metrics.jsonl``."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.file = open(self.run_dir / PARTIAL, "w")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def finish(self) -> None:
        self.file.close()
        os.replace(self.run_dir / PARTIAL, self.run_dir / METRICS)
