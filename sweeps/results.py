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
from sweeps import stats
from training.rundir import CONFIG, SUMMARY, first_row, is_finished, read_json, read_metrics, sustained_row, when

DEFAULT_TARGET = 0.9  # target validation accuracy when a sweep has no early stop
SUSTAINED = "sustained95"  # target: the first evaluation from which validation accuracy stays >= 95% to the end
TARGETS = (0.9, 0.95, 0.99, SUSTAINED)  # what summary.json records (training/loop.py's THRESHOLDS)
UNITS = ("epochs", "steps", "seconds")  # time to target, three ways; rank_key uses steps
CONFIG_KEYS = tuple(flatten(Config()))
STRING_KEYS = {"run", "hash", "point"} | {k for k in CONFIG_KEYS if field_type(k) is str}


def parse_target(text: Optional[str]):
    """``--target`` text to a target: None (default), 0.9, 0.95, 0.99 or ``"sustained95"``."""
    if text is None:
        return None
    if text == SUSTAINED:
        return SUSTAINED
    try:
        value = float(text)
    except ValueError:
        value = None
    match = [t for t in TARGETS[:-1] if value is not None and math.isclose(value, t)]
    if not match:
        raise ValueError(f"--target {text!r} must be one of 0.9, 0.95, 0.99, {SUSTAINED} (what summaries record)")
    return match[0]


def target_text(target) -> str:
    """``"90% validation accuracy"`` or ``"95% validation accuracy, sustained to the end"``."""
    if target == SUSTAINED:
        return "95% validation accuracy, sustained to the end"
    return f"{100 * float(target):g}% validation accuracy"


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


def run_target(flat_config: dict, target) -> object:
    """The target: ``target`` if given, else the run's early-stop accuracy, else 0.9."""
    if target is not None:
        return target
    stop = flat_config.get("train.early_stop_val_acc")
    return DEFAULT_TARGET if stop is None else stop


def reach_times(run_dir: Path, summary: dict, goal) -> tuple:
    """``(epochs, steps, seconds)`` to ``goal`` from the summary where it records them, else from the metrics
    (a summary written before seconds were recorded, or a target the summary has no column for)."""
    if goal == SUSTAINED:
        keys = ("epochs_sustained_95", "steps_sustained_95", "seconds_sustained_95")
    else:
        percent = round(100 * goal)
        keys = tuple(f"{unit}_to_{percent}" for unit in UNITS) if math.isclose(percent, 100 * goal) else ()
    if keys and all(k in summary for k in keys):
        return tuple(summary[k] for k in keys)
    metrics = read_metrics(run_dir)
    return when(sustained_row(metrics, 0.95) if goal == SUSTAINED else first_row(metrics, goal))


def run_row(run_dir: Path, target=None) -> dict:
    """The results row of a finished run: run, hash, target, whether it reached it, the time to it
    (epochs, steps, seconds; None when never) and the time observed (that time when reached, else where the
    run is censored), the flattened resolved config and the summary.

    A run that does not reach the target is censored at its budget (``budget_epochs``, ``budget_steps``;
    seconds: its wall time, scaled up to the budget when it diverged before the end). A run that stopped
    early below the target (its early stop is under ``--target``) is censored where it stopped
    (``censored_early``): it can't tell when it would have reached the target.
    """
    run_dir = Path(run_dir)
    flat = flatten_dict(read_json(run_dir / CONFIG))
    summary = read_json(run_dir / SUMMARY)
    goal = run_target(flat, target)
    times = dict(zip(UNITS, reach_times(run_dir, summary, goal)))
    steps_per_epoch = max(1, round(summary["steps_run"] / summary["epochs_run"])) if summary["epochs_run"] else 1
    budget_steps = flat.get("train.steps") or flat["train.epochs"] * steps_per_epoch
    budget_epochs = flat.get("train.epochs") if not flat.get("train.steps") else budget_steps / steps_per_epoch
    reached = times["epochs"] is not None
    early = not reached and summary.get("early_stopped", False)
    if reached:
        observed = dict(times)
    elif early:
        observed = {"epochs": summary["epochs_run"], "steps": summary["steps_run"], "seconds": summary["wall_s"]}
    else:  # ran its budget (seconds: its wall time) or diverged (its wall time scaled to the budget)
        scale = budget_steps / summary["steps_run"] if summary["steps_run"] else 1.0
        observed = {"epochs": budget_epochs, "steps": budget_steps, "seconds": round(summary["wall_s"] * scale, 3)}
    # The seconds a whole budget would take at this run's pace: only "> budget" in printed medians uses it.
    budget_seconds = round(summary["wall_s"] * budget_steps / summary["steps_run"], 3) if summary["steps_run"] else None
    digest = run_dir.name.rsplit("-", 1)[-1]
    return {"run": run_dir.name, "hash": digest, "optim.name": flat["optim.name"], "seed": flat["seed"],
            "target": goal, "reached": reached, **{f"{u}_to_target": times[u] for u in UNITS},
            **{f"{u}_observed": observed[u] for u in UNITS}, "censored_early": early,
            "budget_epochs": budget_epochs, "budget_steps": budget_steps, "budget_seconds": budget_seconds, **flat,
            **summary}


def collect(out: Path, target=None) -> list[dict]:
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


def write_tables(out: Path, rows: list[dict], annotate=None) -> None:
    """``out/results.csv`` (the rows) and ``out/points.csv`` (``summarize``; ``annotate(points)`` may add
    columns, as the search-edge check does)."""
    points = summarize(rows)
    write_csv(Path(out) / "results.csv", rows)
    write_csv(Path(out) / "points.csv", annotate(points) if annotate else points)


def rebuild_table(out: Path, target=None) -> list[dict]:
    """Rebuild ``out/results.csv`` and ``out/points.csv`` from the run directories; return the run rows."""
    rows = collect(out, target)
    write_tables(out, rows)
    return rows


class ResultsTable:
    """The tables of a sweep that is running: each finished run adds its row (read from its own directory
    alone) and both CSV files are rewritten from the rows in memory."""

    def __init__(self, out: Path, target=None):
        self.out, self.target = Path(out), target
        self.rows = {r["hash"]: r for r in collect(self.out, target)}
        write_tables(self.out, self.table())

    def add(self, run_dir: Path) -> dict:
        row = run_row(run_dir, self.target)
        self.rows[row["hash"]] = row
        write_tables(self.out, self.table())
        return row

    def table(self) -> list[dict]:
        return sorted(self.rows.values(), key=lambda r: r["run"])


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


def censored_statistics(group: list[dict]) -> dict:
    """Statistics of one configuration's runs (its seeds), censoring included.

    ``runs``; ``reached`` of them reached the target, ``censored`` did not (censored where
    ``run_row`` says: at the budget); ``reached_frac``. Per unit (epochs, steps, seconds): the
    Kaplan-Meier median time to target ``<unit>_km_median`` and its 95% interval ``<unit>_km_lower`` /
    ``<unit>_km_upper`` (Brookmeyer-Crowley, ``stats.median_time``), empty where not identified, and
    ``<unit>_km`` as text (``"85 [71, > 400]"``, "> budget" where not identified). Never an average over
    the runs that reached the target alone.
    """
    flags = [bool(r["reached"]) for r in group]
    out = {"runs": len(group), "reached": sum(flags), "censored": len(group) - sum(flags),
           "reached_frac": sum(flags) / len(group)}
    for unit in UNITS:
        times = [r.get(f"{unit}_observed") for r in group]
        median = None
        if all(t is not None for t in times):
            budget = max(r.get(f"budget_{unit}") or t for r, t in zip(group, times))
            median = stats.median_time(stats.kaplan_meier(times, flags), budget=budget)
        out[f"{unit}_km_median"] = median and median.median
        out[f"{unit}_km_lower"] = median and median.lower
        out[f"{unit}_km_upper"] = median and median.upper
        out[f"{unit}_km"] = stats.format_median(median) if median else None
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """One row per configuration over its seeds (``points.csv``): ``censored_statistics`` and the budget,
    the mean best validation accuracy, the seeds and the configuration; best first per optimizer."""
    points = []
    for group in group_points(rows).values():
        first = group[0]
        point = {"point": point_label(first["run"]), "optim.name": first["optim.name"], "target": first["target"],
                 **censored_statistics(group), "budget_epochs": first.get("budget_epochs"),
                 "budget_steps": first.get("budget_steps"),
                 "censored_early": sum(bool(r.get("censored_early")) for r in group),
                 "mean_best_val_acc": statistics.fmean(r["best_val_acc"] for r in group),
                 "seeds": " ".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]))}
        point.update({k: first.get(k) for k in CONFIG_KEYS if k not in ("seed", "optim.name")})
        points.append(point)
    return sorted(points, key=lambda p: (str(p["optim.name"]), rank_key(p)))


def rank_key(point: dict) -> tuple:
    """Best first: the smallest Kaplan-Meier median of optimizer steps to the target (not identified:
    last), then the largest fraction of seeds reaching it, then the smallest upper end of the median's
    interval, then the highest mean best validation accuracy. Steps, not seconds: wall time depends on
    the machine and its load; epochs rank the same as steps at a fixed batch size."""
    def low(x):
        return math.inf if x is None else x
    return (low(point["steps_km_median"]), -point["reached_frac"], low(point["steps_km_upper"]),
            -point["mean_best_val_acc"])


def best_points(points: list[dict]) -> dict:
    """``{optimizer: its best point}`` by ``rank_key``."""
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


def optim_config(point: dict) -> dict:
    """``{optim key: [value]}`` of a point's (or verdict row's) optimizer knobs, unset knobs left out."""
    return {k: [point[k]] for k in CONFIG_KEYS if k.startswith("optim.") and k != "optim.name"
            and point.get(k) is not None}


def best_from_results(out: Path) -> dict:
    """``{optimizer: {optim key: [value]}}``: each optimizer's best configuration in sweep ``out``: the one
    its verdict confirmed (``verdict.csv``) when there is one, else its best point over the tuning runs."""
    out = Path(out)
    confirmed = {}
    if (out / "verdict.csv").exists():
        confirmed = {v["optim.name"]: optim_config(v) for v in read_table(out / "verdict.csv") if v["confirmed"]}
    rows = load_rows(out)
    if not rows and not confirmed:
        raise ValueError(f"{out} has no finished runs")
    best = {name: optim_config(p) for name, p in best_points(summarize(rows)).items()} if rows else {}
    return {**best, **confirmed}


def describe(point: dict) -> str:
    """One line: reached k/n, the Kaplan-Meier median epochs and steps with their intervals."""
    return (f"{point['point']}: reached {point['reached']}/{point['runs']} ({target_text(point['target'])}), "
            f"median epochs {point['epochs_km']}, steps {point['steps_km']} (Kaplan-Meier, 95% interval)")
