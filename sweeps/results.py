"""A sweep's results: one row per finished run (``results.csv``) and statistics per configuration
(``points.csv``), read from the run directories. Nothing here imports matplotlib.
"""
import csv
import math
import os
import re
import statistics
from pathlib import Path
from typing import Optional

from config import Config, field_type, flatten, flatten_dict
from sweeps.spec import HASH_LEN
from training.rundir import CONFIG, SUMMARY, first_reaching, is_finished, read_json, read_metrics

DEFAULT_TARGET = 0.9  # target validation accuracy when a sweep has no early stop
CONFIG_KEYS = tuple(flatten(Config()))
STRING_KEYS = {"run", "hash", "point"} | {k for k in CONFIG_KEYS if field_type(k) is str}


def existing_runs(out: Path) -> dict:
    """``{hash: run directory}`` for every run directory under ``out/runs``."""
    found = {}
    runs_dir = Path(out) / "runs"
    if runs_dir.is_dir():
        for d in sorted(runs_dir.iterdir()):
            match = re.search(rf"-([0-9a-f]{{{HASH_LEN}}})$", d.name)
            if d.is_dir() and match and (d / CONFIG).exists():
                # A finished copy wins over an unfinished one of the same config.
                if match[1] not in found or is_finished(d):
                    found[match[1]] = d
    return found


def run_target(flat_config: dict, target: Optional[float]) -> float:
    """The target accuracy: ``target`` if given, else the run's early-stop accuracy, else 0.9."""
    if target is not None:
        return target
    stop = flat_config.get("train.early_stop_val_acc")
    return DEFAULT_TARGET if stop is None else stop


def run_row(run_dir: Path, target: Optional[float] = None) -> dict:
    """The results row of a finished run: run, hash, target, solved, epochs/steps to target, the flattened
    resolved config and the summary."""
    run_dir = Path(run_dir)
    flat = flatten_dict(read_json(run_dir / CONFIG))
    summary = read_json(run_dir / SUMMARY)
    goal = run_target(flat, target)
    if math.isclose(goal, 0.9):
        epochs, steps = summary["epochs_to_90"], summary["steps_to_90"]
    elif math.isclose(goal, 0.99):
        epochs, steps = summary["epochs_to_99"], summary["steps_to_99"]
    else:
        epochs, steps = first_reaching(read_metrics(run_dir), goal)
    digest = run_dir.name.rsplit("-", 1)[-1]
    return {"run": run_dir.name, "hash": digest, "optim.name": flat["optim.name"], "seed": flat["seed"],
            "target": goal, "solved": epochs is not None, "epochs_to_target": epochs, "steps_to_target": steps,
            **flat, **summary}


def collect(out: Path, target: Optional[float] = None) -> list[dict]:
    """One row per finished run under ``out/runs`` (unfinished directories are left out)."""
    rows = [run_row(d, target) for d in existing_runs(out).values() if is_finished(d)]
    return sorted(rows, key=lambda r: r["run"])


def format_cell(value) -> str:
    return "" if value is None else str(value)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` (union of their keys, in order of appearance) as CSV, atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([format_cell(row.get(k)) for k in columns])
    os.replace(tmp, path)
    return path


def parse_cell(key: str, text: str):
    """A CSV cell back to None, bool, int, float or str."""
    if text == "":
        return None
    if key in STRING_KEYS:
        return text
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_table(path: Path) -> list[dict]:
    """Rows of a results or points CSV, with numbers, booleans and empty cells (None) restored."""
    with open(path, newline="") as f:
        return [{k: parse_cell(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_tables(out: Path, rows: list[dict]) -> None:
    write_csv(Path(out) / "results.csv", rows)
    write_csv(Path(out) / "points.csv", summarize(rows))


def rebuild_table(out: Path, target: Optional[float] = None) -> list[dict]:
    """Rebuild ``out/results.csv`` and ``out/points.csv`` from the run directories; return the run rows."""
    rows = collect(out, target)
    write_tables(out, rows)
    return rows


class ResultsTable:
    """The tables of a sweep that is running: each finished run adds its row (read from its own directory
    alone) and both CSV files are rewritten from the rows in memory."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.rows = {r["hash"]: r for r in collect(self.out)}
        write_tables(self.out, self.table())

    def add(self, run_dir: Path) -> dict:
        row = run_row(run_dir)
        self.rows[row["hash"]] = row
        write_tables(self.out, self.table())
        return row

    def table(self) -> list[dict]:
        return sorted(self.rows.values(), key=lambda r: r["run"])


def censored_median(solved: list, n: int) -> Optional[float]:
    """Median over ``n`` runs of which ``solved`` reached the target; the others count as never (+inf).
    None when half or more never did."""
    if not solved:
        return None
    m = statistics.median(sorted(solved) + [math.inf] * (n - len(solved)))
    return None if math.isinf(m) else m


def point_label(run: str) -> str:
    """A run's name without its seed and hash: the name of its configuration."""
    return re.sub(rf"_s-?\d+-[0-9a-f]{{{HASH_LEN}}}$", "", run)


def point_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in CONFIG_KEYS if k != "seed") + (row["target"],)


def group_points(rows: list[dict]) -> dict:
    """``{point key: [rows]}``: runs grouped by everything in their config but the seed."""
    groups = {}
    for row in rows:
        groups.setdefault(point_key(row), []).append(row)
    return groups


def summarize(rows: list[dict]) -> list[dict]:
    """Statistics per configuration over its seeds.

    ``solved`` of ``n`` runs reached the target; ``epochs_median/min/max`` and ``steps_*`` are over
    solved runs only; ``*_median_all`` counts unsolved runs as censored at the budget (never reached):
    it is None when half or more are unsolved. Unsolved runs are never counted as solved.
    """
    points = []
    for group in group_points(rows).values():
        first, solved = group[0], [r for r in group if r["solved"]]
        stats = {"point": point_label(first["run"]), "optim.name": first["optim.name"], "target": first["target"],
                 "n": len(group), "solved": len(solved), "solved_frac": len(solved) / len(group)}
        for unit in ("epochs", "steps"):
            values = [r[f"{unit}_to_target"] for r in solved]
            stats[f"{unit}_median"] = statistics.median(values) if values else None
            stats[f"{unit}_min"] = min(values) if values else None
            stats[f"{unit}_max"] = max(values) if values else None
            stats[f"{unit}_median_all"] = censored_median(values, len(group))
        stats["budget_epochs"] = first.get("train.epochs")
        stats["mean_best_val_acc"] = statistics.fmean(r["best_val_acc"] for r in group)
        stats["seeds"] = " ".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]))
        stats.update({k: first.get(k) for k in CONFIG_KEYS if k not in ("seed", "optim.name")})
        points.append(stats)
    return sorted(points, key=lambda p: (str(p["optim.name"]), rank_key(p)))


def rank_key(point: dict) -> tuple:
    """Best first: most seeds solved, then fewest optimizer steps (censored median, then solved median),
    then highest validation accuracy."""
    inf = math.inf
    return (-point["solved_frac"], point["steps_median_all"] if point["steps_median_all"] is not None else inf,
            point["steps_median"] if point["steps_median"] is not None else inf, -point["mean_best_val_acc"])


def best_points(points: list[dict]) -> dict:
    """``{optimizer: its best point}``."""
    best = {}
    for p in sorted(points, key=rank_key):
        best.setdefault(p["optim.name"], p)
    return best


def load_rows(out: Path) -> list[dict]:
    """The run rows of sweep directory ``out``: its results.csv, rebuilt from its runs when missing."""
    out = Path(out)
    if (out / "results.csv").exists():
        return read_table(out / "results.csv")
    if not (out / "runs").is_dir():
        raise ValueError(f"{out} is not a sweep directory (no results.csv or runs/)")
    return rebuild_table(out)


def best_from_results(out: Path) -> dict:
    """``{optimizer: {optim key: [value]}}``: each optimizer's best configuration in sweep ``out``."""
    rows = load_rows(out)
    if not rows:
        raise ValueError(f"{out} has no finished runs")
    best = best_points(summarize(rows))
    return {name: {k: [p[k]] for k in CONFIG_KEYS if k.startswith("optim.") and k not in ("optim.name",)
                   and p.get(k) is not None}
            for name, p in best.items()}


def describe(point: dict) -> str:
    epochs, steps = point["epochs_median"], point["steps_median"]
    reached = f"median {epochs:g} epochs / {steps:g} steps among solved" if epochs is not None else "never reached"
    return f"{point['point']}: solved {point['solved']}/{point['n']} (target {point['target']:g}), {reached}"
