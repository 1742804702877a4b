"""Run a sweep: every run of a spec, validated first; the unfinished ones handed to an executor; the tables
updated as each finishes.

A sweep directory ``DIR`` holds::

    DIR/sweep.json                 the spec and command line of the latest invocation
    DIR/runs/<name>-<hash>/        one run: config.json, metrics.jsonl, summary.json (last: finished), log.txt
    DIR/results.csv                one row per finished run (``python -m sweeps table DIR`` rebuilds it)
    DIR/points.csv                 one row per configuration: statistics over its seeds

A directory without ``summary.json`` is unfinished and is redone, never counted.
"""
import dataclasses
import fcntl
import sys
import time
from pathlib import Path

from sweeps.results import ResultsTable, best_points, describe, existing_runs, summarize
from sweeps.spec import Run, Spec, expand
from training.checkpoints import checkpoint_dirs
from training.rundir import is_finished, write_json_atomic


def plan(runs: list[Run], out: Path) -> list[tuple[Run, Path, str]]:
    """``(run, directory, status)`` with status "done", "resume" (unfinished, with a checkpoint), "redo"
    (unfinished, none) or "new"."""
    found = existing_runs(out)
    rows = []
    for run in runs:
        d = found.get(run.hash, Path(out) / "runs" / run.name)
        status = ("done" if is_finished(d) else "resume" if checkpoint_dirs(d) else "redo" if d.exists() else "new")
        rows.append((run, d, status))
    return rows


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


def outcome(row: dict) -> str:
    if row["reached"]:
        return (f"target {row['target']} at epoch {row['epochs_to_target']} (step {row['steps_to_target']}, "
                f"{row['seconds_to_target']} s)")
    return f"target {row['target']} not reached in {row['epochs_run']} epochs"


def run_sweep(spec: Spec, out: Path, executor, dry_run: bool = False, argv=None, target=None, meta=None) -> int:
    """Validate every run of ``spec``, run the unfinished ones into ``out/runs`` with ``executor`` and keep
    ``out/results.csv`` and ``out/points.csv`` up to date (``target``: as ``results.run_row``; ``meta``: more
    entries for ``sweep.json``). Returns the exit status: 1 when any run failed."""
    runs = expand(spec)
    out = Path(out)
    rows = plan(runs, out)
    counts = {s: sum(1 for _, _, status in rows if status == s) for s in ("done", "resume", "redo", "new")}
    per_optimizer = ", ".join(f"{n}: {sum(1 for r in runs if r.config.optim.name == n)}" for n in spec.optimizers)
    header = (f"{spec.kind} sweep in {out}: {len(runs)} runs ({per_optimizer}; seeds {spec.seeds}); "
              f"{counts['done']} done (skipped), {counts['resume']} unfinished (resume from a checkpoint), "
              f"{counts['redo']} unfinished (redo), {counts['new']} new")
    if dry_run:
        for run, d, status in rows:
            print(f"{status:6} {d.name}")
        print(header)
        return 0
    (out / "runs").mkdir(parents=True, exist_ok=True)
    with SweepLock(out):
        write_json_atomic(out / "sweep.json", {"kind": spec.kind, "argv": list(argv or []),
                                               "spec": dataclasses.asdict(spec), "runs": len(runs), "target": target,
                                               **(meta or {})})
        print(header, flush=True)
        todo = [(run, d) for run, d, status in rows if status != "done"]
        print(f"running {len(todo)} with {executor.describe()}", flush=True)
        table, done = ResultsTable(out, target), [0]

        def on_done(run, d, seconds, ok):
            done[0] += 1
            if ok:
                print(f"[{done[0]}/{len(todo)}] {d.name}: {outcome(table.add(d))}, {seconds:.1f} s", flush=True)
            else:
                log = d / "log.txt"
                tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
                print(f"[{done[0]}/{len(todo)}] FAILED {d.name} (log: {log}): {' | '.join(tail)}", flush=True)

        start = time.perf_counter()
        failed = executor.execute(todo, on_done)
        elapsed = time.perf_counter() - start
    finished = table.table()
    print(f"{len(todo) - len(failed)} runs in {elapsed:.1f} s; table: {out / 'results.csv'} "
          f"({len(finished)} finished runs), {out / 'points.csv'}")
    for point in best_points(summarize(finished)).values() if finished else []:
        print("best " + describe(point))
    if failed:
        print(f"{len(failed)} run(s) failed; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0

