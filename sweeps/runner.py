"""Run a sweep: a spec (data) -> validated ``Config``s -> one ``main.train`` per run, in worker processes.

A sweep directory ``DIR`` holds::

    DIR/sweep.json                 the spec and command line of the latest invocation
    DIR/runs/<name>-<hash>/        one run: config.json, metrics.jsonl, summary.json (last: finished), log.txt
    DIR/results.csv                one row per finished run; rebuilt from runs/ (``python -m sweeps table DIR``)
    DIR/points.csv                 one row per configuration: statistics over its seeds

A run is identified by the hash of its full resolved config; its directory name adds the swept
values for people. A directory without ``summary.json`` is unfinished and is redone, never counted.
"""
import dataclasses
import csv
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from main import Config, config_from_dict, first_reaching, flatten, flatten_dict, override, train, write_json_atomic
from optimizers import HYPERPARAMETERS, OPTIMIZERS
from plot import read_metrics

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = 0.9  # target validation accuracy when a sweep has no early stop
HASH_LEN = 8
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
CONFIG_KEYS = tuple(flatten(Config()))
STRING_KEYS = {"run", "hash"} | {k for k, v in flatten(Config()).items() if isinstance(v, str)}

# Short names for run directories; other keys use their last component.
ALIASES = {
    "optim.lr": "lr", "optim.weight_decay": "wd", "optim.beta1": "b1", "optim.beta2": "b2",
    "optim.warmup_steps": "warmup", "model.dropout": "drop", "model.mlp_ratio": "mlp",
    "train.batch_size": "bs", "train.epochs": "ep", "train.early_stop_val_acc": "stop",
    "data.train_fraction": "tf", "data.op": "op", "data.p": "p",
}
OP_NAMES = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


# ---------------------------------------------------------------------------------------------
# Specs

@dataclass
class Spec:
    """A sweep as data.

    Each optimizer contributes grids: ``{"optim.name": [name]}``, the hyperparameter axes of ``optim``
    it uses (or ``optim_by_name[name]``), the ``cross`` axes, and either nothing more (a full grid) or,
    for each knob of ``vary``, that knob's values with the other knobs at ``center`` (one at a time).
    Every point runs once per seed as ``override(Config(), base | point | {"seed": seed})``.
    """
    kind: str  # "optimizers" or "architecture": chooses the figures
    base: dict
    optimizers: list
    optim: dict  # hyperparameter axes shared by the optimizers: key -> values
    seeds: list
    cross: dict = field(default_factory=dict)
    vary: dict = field(default_factory=dict)
    center: dict = field(default_factory=dict)
    optim_by_name: dict = field(default_factory=dict)  # per-optimizer replacement of ``optim``


def default_spec(kind: str) -> Spec:
    """The built-in spec of ``kind`` ("optimizers" or "architecture") over every registered optimizer."""
    from sweeps import architecture, optimizers
    if kind == "optimizers":
        return Spec(kind, dict(optimizers.BASE), list(OPTIMIZERS), {k: list(v) for k, v in optimizers.GRID.items()},
                    list(optimizers.SEEDS))
    if kind == "architecture":
        return Spec(kind, dict(architecture.BASE), list(OPTIMIZERS),
                    {k: [v] for k, v in architecture.BEST.items()}, list(architecture.SEEDS),
                    vary={k: list(v) for k, v in architecture.AXES.items()}, center=dict(architecture.CENTER))
    raise ValueError(f"unknown sweep {kind!r}; choose from ['architecture', 'optimizers']")


def is_hyperparameter(key: str) -> bool:
    return key.startswith("optim.") and key[len("optim."):] in HYPERPARAMETERS


def uses(name: str, key: str) -> bool:
    """Whether optimizer ``name`` uses config key ``key`` (non-hyperparameter keys are used by all)."""
    return not is_hyperparameter(key) or key[len("optim."):] in OPTIMIZERS[name].defaults


def apply_axes(spec: Spec, axes: dict) -> Spec:
    """A copy of ``spec`` where each ``key: [values]`` of ``axes`` (command-line flags) replaces that axis.

    ``optim.name`` and ``seed`` set the optimizers and seeds; a knob of ``vary`` gets new values (its
    center stays when the list holds it, else becomes the first value); an optimizer hyperparameter
    replaces that axis for the optimizers that use it; any other key is set for every run when given
    one value and becomes an axis crossed with everything when given several.
    """
    spec = dataclasses.replace(spec, base=dict(spec.base), optimizers=list(spec.optimizers), optim=dict(spec.optim),
                               seeds=list(spec.seeds), cross=dict(spec.cross), vary=dict(spec.vary),
                               center=dict(spec.center),
                               optim_by_name={k: dict(v) for k, v in spec.optim_by_name.items()})
    for key, values in axes.items():
        values = list(values)
        if not values:
            raise ValueError(f"{key}: empty list of values")
        if key == "optim.name":
            spec.optimizers = values
        elif key == "seed":
            spec.seeds = values
        elif key in spec.vary:
            spec.vary[key] = values
            if spec.center.get(key) not in values:
                spec.center[key] = values[0]
        elif is_hyperparameter(key):
            spec.optim[key] = values
            for axes_of_one in spec.optim_by_name.values():
                axes_of_one[key] = values
        elif len(values) == 1:
            spec.base[key] = values[0]
            spec.cross.pop(key, None)
        else:
            spec.cross[key] = values
            spec.base.pop(key, None)
    for key in axes:
        if is_hyperparameter(key) and not any(uses(n, key) for n in spec.optimizers if n in OPTIMIZERS):
            raise ValueError(f"{key} is not used by {', '.join(map(str, spec.optimizers))}")
    return spec


def check_spec(spec: Spec) -> None:
    """Raise ValueError naming the first empty, unregistered or mistyped part of ``spec``."""
    if not spec.optimizers:
        raise ValueError("no optimizers to sweep")
    for name in spec.optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(OPTIMIZERS)}")
    if not spec.seeds:
        raise ValueError("no seeds")
    for seed in spec.seeds:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed {seed!r} must be an integer")
    if len(set(spec.seeds)) != len(spec.seeds):
        raise ValueError(f"repeated seed in {spec.seeds}")
    axes = [spec.optim, spec.cross, spec.vary, *spec.optim_by_name.values()]
    for key, values in itertools.chain.from_iterable(a.items() for a in axes):
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{key}: axis must be a non-empty list, got {values!r}")
    if set(spec.vary) != set(spec.center):
        raise ValueError(f"vary keys {sorted(spec.vary)} and center keys {sorted(spec.center)} differ")


def grids(spec: Spec) -> list[dict]:
    """The spec as a list of grids ``{key: [values]}``; every grid's product is run."""
    out = []
    for name in spec.optimizers:
        hyper = spec.optim_by_name.get(name, spec.optim)
        head = {"optim.name": [name], **{k: v for k, v in hyper.items() if uses(name, k)}, **spec.cross}
        if not spec.vary:
            out.append(head)
        for knob, values in spec.vary.items():
            out.append({**head, **{k: values if k == knob else [spec.center[k]] for k in spec.vary}})
    return out


# ---------------------------------------------------------------------------------------------
# Runs

@dataclass(frozen=True)
class Run:
    name: str  # directory name: swept values, seed, hash
    hash: str
    config: Config  # resolved


def config_hash(cfg: Config) -> str:
    """Short hash of the full resolved config: the identity of a run."""
    text = json.dumps(dataclasses.asdict(cfg.resolved()), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:HASH_LEN]


def format_value(key: str, value) -> str:
    if key == "data.op":
        return OP_NAMES.get(value, str(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(cfg: Config, keys, digest: str) -> str:
    """``<optimizer>_<alias><value>..._s<seed>-<hash>``, e.g. ``adamw_lr0.003_wd0.3_b10.9_s0-1a2b3c4d``."""
    flat = flatten(cfg)
    parts = [str(flat["optim.name"])]
    parts += [ALIASES.get(k, k.split(".")[-1]) + format_value(k, flat[k]) for k in keys]
    parts.append(f"s{cfg.seed}")
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", "_".join(parts)) + "-" + digest


def swept_keys(gs: list[dict]) -> list:
    """Keys that take more than one value anywhere in the sweep, in order of first appearance."""
    values = {}
    for g in gs:
        for k, v in g.items():
            values.setdefault(k, set()).update(map(repr, v))
    return [k for k in values if k != "optim.name" and len(values[k]) > 1]


def expand(spec: Spec) -> list[Run]:
    """Every run of ``spec``, validated (ValueError on the first bad config), deduplicated, seeds outermost."""
    check_spec(spec)
    gs = grids(spec)
    keys = swept_keys(gs)
    runs, seen = [], set()
    for seed in spec.seeds:
        for g in gs:
            for combo in itertools.product(*g.values()):
                point = dict(zip(g, combo))
                try:
                    cfg = override(Config(), {**spec.base, **point, "seed": seed}).resolved()
                except ValueError as error:
                    where = ", ".join(f"{k}={v!r}" for k, v in point.items())
                    raise ValueError(f"{error} (in run {where}, seed={seed})") from None
                digest = config_hash(cfg)
                if digest not in seen:
                    seen.add(digest)
                    runs.append(Run(run_name(cfg, keys, digest), digest, cfg))
    if not runs:
        raise ValueError("the sweep has no runs")
    return runs


def existing_runs(out: Path) -> dict:
    """``{hash: run directory}`` for every run directory under ``out/runs``."""
    found = {}
    runs_dir = Path(out) / "runs"
    if runs_dir.is_dir():
        for d in sorted(runs_dir.iterdir()):
            match = re.search(rf"-([0-9a-f]{{{HASH_LEN}}})$", d.name)
            if d.is_dir() and match and (d / "config.json").exists():
                # A finished copy wins over an unfinished one of the same config.
                if match[1] not in found or is_finished(d):
                    found[match[1]] = d
    return found


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "summary.json").exists()


def plan(runs: list[Run], out: Path) -> list[tuple[Run, Path, str]]:
    """``(run, directory, status)`` with status "done", "redo" (unfinished directory) or "new"."""
    found = existing_runs(out)
    rows = []
    for run in runs:
        d = found.get(run.hash, Path(out) / "runs" / run.name)
        status = "done" if is_finished(d) else "redo" if d.exists() else "new"
        rows.append((run, d, status))
    return rows


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def worker_env(workers: int) -> dict:
    """The environment of a worker: BLAS threads split among ``workers`` (read when BLAS loads)."""
    env = dict(os.environ)
    threads = str(max(1, cpu_count() // workers))
    env.update({var: threads for var in BLAS_THREAD_VARS})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def execute(todo: list[tuple[Run, Path]], workers: int, on_done) -> list[Run]:
    """Run each ``(run, directory)`` in its own process, ``workers`` at a time; return the failed runs.

    ``on_done(run, directory, seconds, ok)`` is called as each finishes. On KeyboardInterrupt the
    running workers are terminated (their runs stay unfinished, so a rerun redoes them).
    """
    env, pending, running, failed = worker_env(workers), deque(todo), {}, []
    try:
        while pending or running:
            while pending and len(running) < workers:
                run, d = pending.popleft()
                d.mkdir(parents=True, exist_ok=True)
                (d / "summary.json").unlink(missing_ok=True)
                write_json_atomic(d / "config.json", dataclasses.asdict(run.config))
                with open(d / "log.txt", "w") as log:
                    proc = subprocess.Popen([sys.executable, "-m", "sweeps", "_run", str(d.resolve()), run.hash],
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, cwd=REPO)
                running[proc] = (run, d, time.perf_counter())
            time.sleep(0.05)
            for proc in [p for p in running if p.poll() is not None]:
                run, d, start = running.pop(proc)
                ok = proc.returncode == 0 and is_finished(d)
                if not ok:
                    failed.append(run)
                on_done(run, d, time.perf_counter() - start, ok)
    except KeyboardInterrupt:
        for proc in running:
            proc.terminate()
        for proc in running:
            proc.wait()
        raise
    return failed


def worker_main(run_dir: str, expected_hash: str) -> int:
    """Body of a worker process: train the config in ``run_dir/config.json`` into ``run_dir``."""
    run_dir = Path(run_dir)
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    assert config_hash(cfg) == expected_hash, f"{run_dir}: config.json does not match hash {expected_hash}"
    train(cfg, run_dir, progress=False)
    return 0


class SweepLock:
    """An exclusive lock on a sweep directory, so two sweeps never train into the same run directories."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"

    def __enter__(self):
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ValueError(f"another sweep is running in {self.path.parent}") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


# ---------------------------------------------------------------------------------------------
# Results table and statistics

def run_target(flat_config: dict, target: Optional[float]) -> float:
    """The target accuracy: ``target`` if given, else the run's early-stop accuracy, else 0.9."""
    if target is not None:
        return target
    stop = flat_config.get("train.early_stop_val_acc")
    return DEFAULT_TARGET if stop is None else stop


def collect(out: Path, target: Optional[float] = None) -> list[dict]:
    """One row per finished run under ``out/runs``: run, hash, target, solved, epochs/steps to target,
    the flattened resolved config and the summary. Unfinished directories are left out."""
    rows = {}
    for digest, d in existing_runs(out).items():
        if not is_finished(d):
            continue
        flat = flatten_dict(json.loads((d / "config.json").read_text()))
        summary = json.loads((d / "summary.json").read_text())
        goal = run_target(flat, target)
        if math.isclose(goal, 0.9):
            epochs, steps = summary["epochs_to_90"], summary["steps_to_90"]
        elif math.isclose(goal, 0.99):
            epochs, steps = summary["epochs_to_99"], summary["steps_to_99"]
        else:
            epochs, steps = first_reaching(read_metrics(d), goal)
        rows[digest] = {"run": d.name, "hash": digest, "optim.name": flat["optim.name"], "seed": flat["seed"],
                        "target": goal, "solved": epochs is not None, "epochs_to_target": epochs,
                        "steps_to_target": steps, **flat, **summary}
    return sorted(rows.values(), key=lambda r: r["run"])


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


def rebuild_table(out: Path, target: Optional[float] = None) -> list[dict]:
    """Rebuild ``out/results.csv`` and ``out/points.csv`` from the run directories; return the run rows."""
    out = Path(out)
    rows = collect(out, target)
    write_csv(out / "results.csv", rows)
    write_csv(out / "points.csv", summarize(rows))
    return rows


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
    return {name: {k: [p[k]] for k in CONFIG_KEYS if k.startswith("optim.") and k != "optim.name"
                   and p.get(k) is not None}
            for name, p in best.items()}


# ---------------------------------------------------------------------------------------------
# A whole sweep

def describe(point: dict) -> str:
    epochs, steps = point["epochs_median"], point["steps_median"]
    reached = f"median {epochs:g} epochs / {steps:g} steps among solved" if epochs is not None else "never reached"
    return (f"{point['point']}: solved {point['solved']}/{point['n']} (target {point['target']:g}), {reached}")


def run_sweep(spec: Spec, out: Path, workers: int = 1, dry_run: bool = False, media: Optional[Path] = None,
              argv=None) -> int:
    """Validate every run of ``spec``, then run the unfinished ones into ``out/runs`` and write the table
    and (when ``media`` is given) the figures. Returns the exit status: 1 when any run failed."""
    if workers < 1:
        raise ValueError(f"--workers={workers} must be >= 1")
    runs = expand(spec)
    out = Path(out)
    rows = plan(runs, out)
    counts = {s: sum(1 for _, _, status in rows if status == s) for s in ("done", "redo", "new")}
    per_optimizer = ", ".join(f"{n}: {sum(1 for r in runs if r.config.optim.name == n)}" for n in spec.optimizers)
    header = (f"{spec.kind} sweep in {out}: {len(runs)} runs ({per_optimizer}; seeds {spec.seeds}); "
              f"{counts['done']} done (skipped), {counts['redo']} unfinished (redo), {counts['new']} new")
    if dry_run:
        for run, d, status in rows:
            print(f"{status:5} {d.name}")
        print(header)
        return 0
    (out / "runs").mkdir(parents=True, exist_ok=True)
    with SweepLock(out):
        write_json_atomic(out / "sweep.json", {"kind": spec.kind, "argv": list(argv or []),
                                               "spec": dataclasses.asdict(spec), "runs": len(runs)})
        print(header, flush=True)
        todo = [(run, d) for run, d, status in rows if status != "done"]
        print(f"running {len(todo)} with {workers} worker(s), "
              f"{max(1, cpu_count() // workers)} BLAS thread(s) each", flush=True)
        done = [0]

        def on_done(run, d, seconds, ok):
            done[0] += 1
            if ok:
                table = rebuild_table(out)
                row = next(r for r in table if r["hash"] == run.hash)
                result = (f"target {row['target']:g} at epoch {row['epochs_to_target']} (step {row['steps_to_target']})"
                          if row["solved"] else f"target {row['target']:g} not reached in {row['epochs_run']} epochs")
                print(f"[{done[0]}/{len(todo)}] {d.name}: {result}, {seconds:.1f} s", flush=True)
            else:
                tail = (d / "log.txt").read_text().strip().splitlines()[-3:]
                print(f"[{done[0]}/{len(todo)}] FAILED {d.name} (log: {d / 'log.txt'}): {' | '.join(tail)}",
                      flush=True)

        start = time.perf_counter()
        failed = execute(todo, workers, on_done)
        elapsed = time.perf_counter() - start
        table = rebuild_table(out)
    print(f"{len(todo) - len(failed)} runs in {elapsed:.1f} s; table: {out / 'results.csv'} "
          f"({len(table)} finished runs), {out / 'points.csv'}")
    for point in best_points(summarize(table)).values() if table else []:
        print("best " + describe(point))
    if media is not None and table:
        from sweeps.plot import save_figures
        for path in save_figures(out, media):
            print(f"saved {path}")
    if failed:
        print(f"{len(failed)} run(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0
