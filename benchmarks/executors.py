"""Per-run overhead of the executors: the same tiny sweep through the local pool and through Ray, alternating.

    python benchmarks/executors.py [--runs 4] [--repeats 3] [--epochs 3] [--concurrency 2]

Each repeat runs the sweep (p=7, '+', dim 16, depth 1, ``--runs`` learning rates, one seed) into a fresh
directory with each executor in turn, the order flipped every repeat; both run ``--concurrency`` runs at
once with one BLAS thread each (``LocalPool(workers=concurrency)``; Ray tasks of 1 CPU on a local instance of
``concurrency`` CPUs, started once before the repeats and timed on its own). Prints per repeat and executor
the seconds per run (the sweep's time / runs), the runs' own training time (``wall_s``, mean, divided by
the concurrency: the sweep's time per run if the executor cost nothing) and the difference: what the
executor adds to a run (process start, imports, scheduling, shipping files).
Ray is optional here too: without it only the local pool is timed.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from sweeps.__main__ import parse_sweep_args  # noqa: E402
from sweeps.executors import LocalPool  # noqa: E402
from sweeps.runner import run_sweep  # noqa: E402
from training.rundir import read_json  # noqa: E402


def timed_sweep(spec, out: Path, executor) -> tuple:
    """``(seconds per run, mean wall_s of the runs)`` of one sweep, its output swallowed."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_sweep(spec, out, executor) == 0
    seconds = time.perf_counter() - start
    walls = [read_json(p)["wall_s"] for p in (out / "runs").glob("*/summary.json")]
    return seconds / len(walls), statistics.mean(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    lrs = ",".join(f"{1e-3 * (i + 1):g}" for i in range(args.runs))
    spec, _, _ = parse_sweep_args("optimizers", ["--p", "7", "--op", "+", "--dim", "16", "--depth", "1",
                                                 "--batch-size", "8", "--epochs", str(args.epochs),
                                                 "--optimizers", "adamw", "--lr", lrs, "--seeds", "0"])
    executors = {"local": LocalPool(args.concurrency, "off")}
    try:
        import ray
        from sweeps.ray_executor import RayExecutor, job_runtime_env
        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.concurrency, include_dashboard=False,
                 runtime_env=job_runtime_env(), logging_level=logging.WARNING)
        print(f"Ray: local instance of {args.concurrency} CPUs started in {time.perf_counter() - start:.1f} s "
              "(paid once per sweep when the driver starts its own; not in the numbers below)")
        executors["ray"] = RayExecutor(cpus_per_run=1, checkpoint_every="off")
    except ImportError:
        print("Ray is not installed (pip install -r requirements-ray.txt): timing the local pool only")
    print(f"{args.runs} runs x {args.epochs} epochs, {args.concurrency} at once, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'repeat':>6} {'executor':>8} {'s/run':>7} {'train s/run':>11} {'overhead s/run':>14}")
    overhead = {name: [] for name in executors}
    per_run = {name: [] for name in executors}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in list(executors)[::1 if repeat % 2 == 0 else -1]:
                seconds, wall = timed_sweep(spec, Path(tmp) / f"{name}{repeat}", executors[name])
                train = wall / args.concurrency
                per_run[name].append(seconds)
                overhead[name].append(seconds - train)
                print(f"{repeat:>6} {name:>8} {seconds:7.3f} {train:11.3f} {seconds - train:14.3f}", flush=True)
    for name, values in per_run.items():
        note = " (its first repeat starts the worker processes)" if name == "ray" else ""
        print(f"{name}: median {statistics.median(values):.3f} s per run "
              f"(overhead {statistics.median(overhead[name]):.3f}), min {min(values):.3f}{note}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
