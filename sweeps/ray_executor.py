"""``RayExecutor``: a sweep's runs as Ray tasks, on one machine or a cluster, with the same run directories.

The driver's run directory stays the single source of truth, so workers need no shared file system. Each run
is one task (``ray.remote``, ``num_cpus`` / ``num_gpus`` declared) that gets the run's files as bytes
(config.json and, when resuming, its metrics and checkpoints), trains into a temporary directory on the
worker and returns that directory's files as bytes; the driver collects results as they finish
(``ray.wait``) and writes each file atomically, ``summary.json`` last. A worker that dies (killed process,
lost node) is retried ``retries`` times by Ray, from the checkpoint the run had when it was submitted; an
exception in training is not retried. Either way the run stays unfinished (no summary.json) and the next
invocation, with any executor, redoes it.

BLAS threads: BLAS reads its thread count once, when it loads (fastblas, before mlx), and Ray reuses worker
processes. So the thread variables are set per task through ``runtime_env={"env_vars": ...}``: Ray starts
(and reuses) separate worker processes for each distinct runtime environment, so a worker's variables are
in place before its first import and every run in it has ``cpus_per_run`` threads.

Ray is optional (requirements-ray.txt) and imported only here, inside functions: workers import this module
to find the task, and nothing at its top imports mlx, so ``fastblas`` loads first inside the task.
"""
import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from sweeps.executors import BLAS_THREAD_VARS, REPO, prepare
from training.rundir import METRICS, PARTIAL, SUMMARY

INSTALL_HINT = "pip install -r requirements-ray.txt"
LOG = "log.txt"
# What a worker needs of the repository: the code, not the results or figures (.gitignore is honoured too).
EXCLUDES = ["media", "runs", "tests/data"]  # .git: excluded by Ray already


def import_ray():
    """The ``ray`` module; ValueError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def job_runtime_env() -> dict:
    """The job-level runtime environment: the repository shipped to every worker as its working directory."""
    return {"working_dir": str(REPO), "excludes": EXCLUDES}


def read_files(run_dir: Path) -> dict:
    """``{relative path: bytes}`` of what a run directory hands a worker: config.json, metrics, checkpoints
    (not the log, nor half-written ``.tmp`` / ``.partial-`` leftovers)."""
    files = {}
    for path in sorted(Path(run_dir).rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and str(rel) != LOG and not path.name.endswith(".tmp") \
                and not any(part.startswith(".partial-") for part in rel.parts):
            files[rel.as_posix()] = path.read_bytes()
    return files


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_files(run_dir: Path, files: dict) -> None:
    """Make ``run_dir`` hold what the worker's directory held: each file atomically, each checkpoint directory
    renamed into place whole, the checkpoints and metrics files the worker dropped removed, ``summary.json``
    last."""
    run_dir = Path(run_dir)
    plain, whole = {}, {}
    for rel, data in files.items():
        parts = rel.split("/")
        assert ".." not in parts and not rel.startswith("/"), rel
        if len(parts) > 2:  # e.g. checkpoints/step_N/model.safetensors: one directory, moved in whole
            whole.setdefault("/".join(parts[:2]), {})["/".join(parts[2:])] = data
        else:
            plain[rel] = data
    for rel, data in plain.items():
        if rel != SUMMARY:
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(run_dir / rel, data)
    for rel, members in whole.items():
        final = run_dir / rel
        tmp = final.with_name(".partial-" + final.name)
        shutil.rmtree(tmp, ignore_errors=True)
        for name, data in members.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    for parent in ("checkpoints", "snapshots"):
        for old in sorted((run_dir / parent).iterdir()) if (run_dir / parent).is_dir() else []:
            if f"{parent}/{old.name}" not in whole and f"{parent}/{old.name}" not in plain:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    for name in (METRICS, PARTIAL):
        if name not in plain:
            (run_dir / name).unlink(missing_ok=True)  # e.g. the partial metrics once metrics.jsonl came back
    if SUMMARY in plain:
        write_bytes_atomic(run_dir / SUMMARY, plain[SUMMARY])  # last: marks the run finished


def train_task(payload: dict) -> dict:
    """One run on a Ray worker: ``payload`` (files, hash, checkpoint interval) -> ``{"files", "seconds"}``.
    Trains in a temporary directory with stdout and stderr in its ``log.txt``."""
    start = time.perf_counter()
    expected = payload["threads"]
    assert all(os.environ.get(var) == expected for var in BLAS_THREAD_VARS), \
        f"BLAS thread variables are not {expected} in this worker"
    with tempfile.TemporaryDirectory(prefix="grokking-run-") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        for rel, data in payload["files"].items():
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / rel).write_bytes(data)
        with open(run_dir / LOG, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            import fastblas  # noqa: F401  (before mlx, in a fresh worker; a no-op in a reused one)
            from sweeps import worker
            try:
                worker.main(str(run_dir), payload["hash"], payload["checkpoint_every"])
            except Exception:
                traceback.print_exc()  # into the log the driver writes; the run stays unfinished
        return {"files": read_files(run_dir) | {LOG: (run_dir / LOG).read_bytes()},
                "seconds": time.perf_counter() - start}


class RayExecutor:
    """Each run a Ray task with ``cpus_per_run`` CPUs (and BLAS threads) and ``gpus_per_run`` GPUs, retried
    ``retries`` times when its worker dies. ``address``: a running cluster (``"auto"``, ``"HOST:PORT"``,
    ``"ray://HOST:PORT"``); None starts a local Ray instance for the sweep, even where one is running. When
    Ray is already initialised in this process it is used as it is (its job must make this repository
    importable on the workers, e.g. with ``job_runtime_env()``). ``task``: the function each task runs
    (``train_task``; tests wrap it)."""

    def __init__(self, address=None, cpus_per_run: float = 1, gpus_per_run: float = 0, retries: int = 2,
                 checkpoint_every: str = "10", task=train_task):
        import_ray()
        if not 0 < cpus_per_run < math.inf:
            raise ValueError(f"--ray-cpus-per-run={cpus_per_run} must be > 0")
        if not 0 <= gpus_per_run < math.inf:
            raise ValueError(f"--ray-gpus-per-run={gpus_per_run} must be >= 0")
        if retries < 0:
            raise ValueError(f"--ray-retries={retries} must be >= 0")
        self.address, self.cpus_per_run, self.gpus_per_run = address, cpus_per_run, gpus_per_run
        self.retries, self.checkpoint_every, self.task = retries, checkpoint_every, task

    @property
    def threads(self) -> str:
        """Each run's BLAS threads: its whole CPUs (at least 1)."""
        return str(max(1, int(self.cpus_per_run)))

    def describe(self) -> str:
        where = f"the Ray cluster at {self.address}" if self.address else "Ray"
        gpus = f", {self.gpus_per_run:g} GPU(s)" if self.gpus_per_run else ""
        return (f"{where}: each run a task with {self.cpus_per_run:g} CPU(s){gpus} and {self.threads} BLAS "
                f"thread(s), retried up to {self.retries} time(s) if its worker dies")

    def remote(self, ray):
        """The task with its resources, retries and environment (the thread variables) declared."""
        env = {"env_vars": {var: self.threads for var in BLAS_THREAD_VARS}}
        return ray.remote(self.task).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                             max_retries=self.retries, retry_exceptions=False, runtime_env=env)

    def execute(self, todo: list, on_done) -> list:
        """Run each ``(run, directory)`` as a task; ``on_done(run, directory, seconds, ok)`` as each finishes
        (seconds: the task's own time on its worker). Returns the failed runs. On KeyboardInterrupt the tasks
        are cancelled (their runs stay unfinished)."""
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.address or "local", runtime_env=job_runtime_env(),
                         logging_level=logging.WARNING, **({} if self.address else {"include_dashboard": False}))
            except ConnectionError as error:
                cause = f" ({error.__cause__.__class__.__name__})" if error.__cause__ is not None else ""
                raise ValueError(f"{error}{cause}; a cluster with token authentication needs its token here "
                                 "(~/.ray/auth_token or RAY_AUTH_TOKEN) and RAY_AUTH_MODE=token") from None
        try:
            return self._execute(ray, todo, on_done)
        finally:
            if started_here:
                ray.shutdown()

    def _execute(self, ray, todo: list, on_done) -> list:
        task = self.remote(ray)
        # Submit a window of runs, not all: each task's files wait in the object store until it runs.
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_run))
        pending, running, failed = list(todo), {}, []
        try:
            while pending or running:
                while pending and len(running) < 2 * slots:
                    run, d = pending.pop(0)
                    prepare(run, d)
                    payload = {"files": read_files(d), "hash": run.hash, "checkpoint_every": self.checkpoint_every,
                               "threads": self.threads}
                    running[task.remote(payload)] = (run, d, time.perf_counter())
                (ref,), _ = ray.wait(list(running), num_returns=1)
                run, d, submitted = running.pop(ref)
                try:
                    result = ray.get(ref)
                    write_files(d, result["files"])
                except ray.exceptions.RayError as error:  # e.g. the worker died on every one of its tries
                    (d / LOG).write_text(f"the task failed ({error.__class__.__name__}; a dead worker is retried "
                                         f"{self.retries} time(s)): {error}\n")
                    result = {"files": {}, "seconds": time.perf_counter() - submitted}
                ok = SUMMARY in result["files"]
                if not ok:
                    failed.append(run)
                on_done(run, d, result["seconds"], ok)
        except KeyboardInterrupt:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
        return failed

