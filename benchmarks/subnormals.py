"""What flushing subnormal floats to zero saves, on a run's own latest checkpoint:

    python benchmarks/subnormals.py RUN_DIR [--repeats 3] [--epochs 2]

Each measurement is a fresh process (the floating-point mode is per thread, inherited by the threads a
process starts) that loads RUN_DIR's newest checkpoint into the speed layer's trainer, with subnormals
flushed (as the trainer does) or kept (the IEEE default), and times ``--epochs`` epochs of its training
rows; the two kinds alternate ``--repeats`` times. It prints the medians and their ratio. A run early in
training barely differs; a long run without weight decay (``--preset power2022-late`` past 10^4 steps) has
subnormal activations and gradients, which slow GEMM and elementwise kernels down.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time, json
from pathlib import Path
sys.path.insert(0, {repo!r})
import fastblas
import training.speed.trainer as speed
if not {flush}:
    speed.flush_subnormals = lambda: False
import mlx.core as mx
import numpy as np
import data
from config import config_from_dict
from training import checkpoints

run = {run!r}
cfg = config_from_dict(json.load(open(run + "/config.json"))).resolved()
trainer = speed.FastTrainer(cfg)
checkpoint = checkpoints.latest_checkpoint(Path(run))
if checkpoint is None:
    sys.exit("no readable checkpoint")
trainer.load_state(checkpoint.parameters, checkpoint.optimizer_state)
x, y, _, _ = data.split(cfg.data, np.random.default_rng(cfg.seed))
x, y = mx.array(x), mx.array(y)
order = mx.array(np.random.default_rng(0).permutation(len(x)))
with trainer.running():
    mx.eval(trainer.steps(x, y, order, cfg.train.batch_size))  # compile, warm up
    start = time.perf_counter()
    for _ in range({epochs}):
        mx.eval(trainer.steps(x, y, order, cfg.train.batch_size))
    seconds = time.perf_counter() - start
steps = {epochs} * -(-len(x) // cfg.train.batch_size)
print(json.dumps({{"step": checkpoint.meta["step"], "ms_per_step": 1e3 * seconds / steps}}))
"""


def measure(run: Path, flush: bool, epochs: int) -> dict:
    code = CHILD.format(repo=str(REPO), flush=flush, run=str(run), epochs=epochs)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: measuring {run} failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a run directory with checkpoints")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    for flag, value in (("--repeats", args.repeats), ("--epochs", args.epochs)):
        if value < 1:
            parser.error(f"{flag}={value} must be >= 1")
    if not (args.run / "config.json").is_file() or not list((args.run / "checkpoints").glob("step_*")):
        parser.error(f"{args.run} is not a run directory with checkpoints (config.json, checkpoints/step_*)")
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for flush in (True, False):
            result = measure(args.run, flush, args.epochs)
            times[flush].append(result["ms_per_step"])
    flushed, kept = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.run} at step {result['step']}: {args.epochs} epochs x {args.repeats} alternating repeats")
    print(f"  subnormals flushed: {flushed:.1f} ms/step   kept: {kept:.1f} ms/step   kept/flushed: {kept / flushed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
