"""The Ray executor: the local executor's results, resume across executors, dead workers retried, a killed
driver's sweep finished by the next invocation. One local Ray instance (2 CPUs) serves every test."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is optional and not installed: pip install -r requirements-ray.txt")

from config import flatten  # noqa: E402
from sweeps import results  # noqa: E402
from sweeps.__main__ import main_cli, parse_sweep_args  # noqa: E402
from sweeps.executors import BLAS_THREAD_VARS  # noqa: E402
from sweeps.ray_executor import RayExecutor, job_runtime_env, train_task  # noqa: E402
from sweeps.runner import run_sweep  # noqa: E402
from sweeps.spec import expand  # noqa: E402
from training.rundir import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["optimizers", "--p", "7", "--op", "+", "--dim", "16", "--depth", "1", "--batch-size", "8", "--epochs", "4",
        "--optimizers", "adamw", "--weight-decay", "0.1", "--seeds", "0", "--checkpoint-every", "1", "--no-plot"]
TIMING = {"elapsed_s", "wall_s", "ms_per_step", "ms_per_eval"}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance for the module; its address lets a driver in a subprocess join it."""
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=job_runtime_env(),
                       logging_level=logging.WARNING)
    yield context.address_info["address"]
    ray.shutdown()


def untimed(rows: list[dict]) -> list[dict]:
    """Rows without wall-clock fields (also the seconds to target and the budget in seconds)."""
    return [{k: v for k, v in row.items() if k not in TIMING and "seconds" not in k} for row in rows]


def table(out: Path) -> dict:
    """``{hash: results row}`` without timings, nor the directory name (it names only the swept keys)."""
    return {row["hash"]: {k: v for k, v in row.items() if k != "run"}
            for row in untimed(results.read_table(out / "results.csv"))}


def metrics(out: Path) -> dict:
    return {d.name.rsplit("-", 1)[1]: untimed(read_metrics(d)) for d in (out / "runs").iterdir()}


def summary_mtimes(out: Path) -> dict:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def test_ray_gives_the_local_results_and_resumes_what_the_other_executor_left(cluster, tmp_path, capsys):
    local, mixed = tmp_path / "local", tmp_path / "mixed"
    three = TINY + ["--lr", "1e-3,3e-3,1e-2"]
    assert main_cli(three + ["--workers", "3", "--out", str(local)]) == 0  # 1 BLAS thread each, as on Ray
    # Started locally: one run finished, one killed as its 4th epoch starts (checkpoints at epochs 1-3) ...
    assert main_cli(TINY + ["--lr", "1e-3", "--out", str(mixed)]) == 0
    (finished,) = (mixed / "runs").iterdir()
    spec, _, _ = parse_sweep_args("optimizers", three[1:])
    victim = next(run for run in expand(spec) if run.config.optim.lr == 3e-3)
    victim_dir = mixed / "runs" / victim.name
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "harness" / "killed_run.py"),
                             json.dumps(flatten(victim.config)), str(victim_dir), "steps:4", "1"],
                            cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    partial = [json.loads(line) for line in (victim_dir / "metrics.jsonl.partial").read_text().splitlines()]
    assert len(partial) == 3
    before = summary_mtimes(mixed)
    capsys.readouterr()
    # ... finished on Ray: the finished run skipped, the killed one continued from its checkpoint.
    assert main_cli(three + ["--executor", "ray", "--out", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "1 done (skipped), 1 unfinished (resume from a checkpoint), 0 unfinished (redo), 1 new" in out
    assert "running 2 with Ray" in out
    assert summary_mtimes(mixed)[finished.name] == before[finished.name]
    assert [r["elapsed_s"] for r in read_metrics(victim_dir)[:3]] == [r["elapsed_s"] for r in partial]
    assert not list(victim_dir.glob("*.partial")) and not list(victim_dir.rglob(".partial-*"))
    assert table(mixed) == table(local)
    assert metrics(mixed) == metrics(local)
    # And back: the local executor finds every run done.
    assert main_cli(three + ["--out", str(mixed)]) == 0
    assert "3 done (skipped), 0 unfinished (resume from a checkpoint), 0 unfinished (redo), 0 new" in \
        capsys.readouterr().out


def test_a_killed_worker_is_retried_and_the_sweep_completes(cluster, tmp_path, capsys):
    spec, _, _ = parse_sweep_args("optimizers", TINY[1:] + ["--lr", "1e-3,3e-3"])
    marker = tmp_path / "killed-once"

    def dies_on_first_try(payload):  # nested: pickled by value, so the workers need not import this file
        if payload["hash"] == first and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return train_task(payload)

    first = expand(spec)[0].hash
    executor = RayExecutor(retries=1, checkpoint_every="1", task=dies_on_first_try)
    assert run_sweep(spec, tmp_path / "sweep", executor) == 0
    assert marker.exists()  # the first try died ...
    assert len(results.read_table(tmp_path / "sweep" / "results.csv")) == 2  # ... and the retry finished it
    assert "retried up to 1 time(s)" in capsys.readouterr().out


def test_a_worker_that_keeps_dying_is_recorded_as_failed(cluster, tmp_path, capsys):
    spec, _, _ = parse_sweep_args("optimizers", TINY[1:] + ["--lr", "1e-3"])

    def always_dies(payload):
        os.kill(os.getpid(), signal.SIGKILL)

    executor = RayExecutor(retries=0, task=always_dies)
    assert run_sweep(spec, tmp_path / "sweep", executor) == 1
    (run_dir,) = (tmp_path / "sweep" / "runs").iterdir()
    assert not (run_dir / "summary.json").exists() and (run_dir / "config.json").exists()
    assert "WorkerCrashedError" in (run_dir / "log.txt").read_text()
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "rerun the same command" in captured.err


def test_a_killed_driver_leaves_its_finished_runs_and_the_rerun_does_only_the_rest(cluster, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = TINY + ["--lr", "1e-3,3e-3,1e-2", "--executor", "ray", "--ray-cpus-per-run", "2", "--out", str(out)]
    driver = subprocess.Popen([sys.executable, "-m", "sweeps", *argv, "--ray-address", cluster], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(out.glob("runs/*/summary.json")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    driver.kill()  # after its first run came back (2 CPUs a run on 2: one at a time)
    _, stderr = driver.communicate()
    assert driver.returncode == -signal.SIGKILL, stderr
    before = summary_mtimes(out)
    assert 1 <= len(before) < 3
    capsys.readouterr()
    assert main_cli(argv) == 0
    assert f"{len(before)} done (skipped)" in capsys.readouterr().out
    after = summary_mtimes(out)
    assert len(after) == 3 and all(after[name] == mtime for name, mtime in before.items())


def test_each_task_has_as_many_blas_threads_as_cpus_it_declares(cluster):
    def thread_variables(payload):
        return {var: os.environ.get(var) for var in BLAS_THREAD_VARS}

    for cpus, threads in ((2, "2"), (1, "1"), (0.5, "1")):
        task = RayExecutor(cpus_per_run=cpus, task=thread_variables).remote(ray)
        assert ray.get(task.remote({})) == dict.fromkeys(BLAS_THREAD_VARS, threads)
