"""Executors: how a sweep's runs get run. An executor takes ``(run, directory)`` pairs and reports each as it
finishes; the run directories (config.json, metrics.jsonl, summary.json written last) are the results.

``LocalPool`` runs each in its own worker process (``python -m sweeps.worker``) on this machine.
"""
import dataclasses
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from training.rundir import CONFIG, SUMMARY, is_finished, write_json_atomic

REPO = Path(__file__).resolve().parent.parent
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def worker_env(threads: int) -> dict:
    """The environment of a worker with ``threads`` BLAS threads (read when BLAS loads)."""
    env = dict(os.environ)
    env.update({var: str(max(1, threads)) for var in BLAS_THREAD_VARS})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def prepare(run, run_dir: Path) -> None:
    """Make ``run_dir`` an unfinished run of ``run``: its config written, no summary (a checkpoint stays)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SUMMARY).unlink(missing_ok=True)
    write_json_atomic(run_dir / CONFIG, dataclasses.asdict(run.config))


class LocalPool:
    """Up to ``workers`` worker processes at once, each with ``cores // workers`` BLAS threads; each run keeps
    a checkpoint every ``checkpoint_every`` (text as ``checkpoints.Interval.parse`` reads it)."""

    def __init__(self, workers: int = 1, checkpoint_every: str = "10"):
        if workers < 1:
            raise ValueError(f"--workers={workers} must be >= 1")
        self.workers, self.checkpoint_every = workers, checkpoint_every

    def describe(self) -> str:
        return f"{self.workers} worker(s), {max(1, cpu_count() // self.workers)} BLAS thread(s) each"

    def execute(self, todo: list, on_done) -> list:
        """Run each ``(run, directory)``; ``on_done(run, directory, seconds, ok)`` as each finishes. Returns the
        failed runs. On KeyboardInterrupt the workers are terminated (their runs stay unfinished)."""
        env = worker_env(cpu_count() // self.workers)
        pending, running, failed = deque(todo), {}, []
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    run, d = pending.popleft()
                    prepare(run, d)
                    with open(d / "log.txt", "w") as log:
                        proc = subprocess.Popen([sys.executable, "-m", "sweeps.worker", str(d.resolve()), run.hash,
                                                 self.checkpoint_every],
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
