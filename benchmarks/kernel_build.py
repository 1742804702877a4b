"""What building MLX's fused CPU kernels for this CPU saves (``training/speed/compiler.py``):

    python benchmarks/kernel_build.py [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

Each measurement is a fresh process that trains the default run (``training.loop.train``, no files) for
``--epochs`` epochs with the kernels built as MLX builds them (baseline x86-64) or for this CPU (the speed
layer's default); the two kinds alternate ``--repeats`` times. Each kind's kernels come from its own cache,
filled by an unmeasured one-epoch run first (a first build costs g++ a second or so per kernel). It prints
the median ms per step and per evaluation of each kind, their ratios, and whether the two kinds gave the
same metrics, which they should to the last bit (``-ffp-contract=off``).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys, json, hashlib
sys.path.insert(0, {repo!r})
import fastblas
import training.speed.trainer as speed
if not {native}:
    speed.build_kernels_for_this_cpu = lambda: False
from config import Config, override, parse_value
from training.loop import train
cfg = override(Config(), {{k: parse_value(v) if isinstance(v, str) else v for k, v in {overrides!r}.items()}})
summary = train(cfg, progress=False)
print(json.dumps({{k: summary[k] for k in ("ms_per_step", "ms_per_eval", "wall_s", "final_val_loss",
                                            "final_train_loss")}}))
"""


def measure(native: bool, overrides: dict) -> dict:
    code = CHILD.format(repo=str(REPO), native=native, overrides=overrides)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: a {'native' if native else 'baseline'} run failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. optim.name=quad")
    args = parser.parse_args(argv)
    for flag, value in (("--repeats", args.repeats), ("--epochs", args.epochs)):
        if value < 1:
            parser.error(f"{flag}={value} must be >= 1")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r} must be KEY=VALUE")
        overrides[key] = value
    for native in (False, True):  # fill each kind's kernel cache
        measure(native, {**overrides, "train.epochs": 1})
    runs = {False: [], True: []}
    for _ in range(args.repeats):
        for native in (False, True):
            runs[native].append(measure(native, {**overrides, "train.epochs": args.epochs}))
    med = {native: {k: statistics.median(r[k] for r in rs) for k in ("ms_per_step", "ms_per_eval", "wall_s")}
           for native, rs in runs.items()}
    same = all(r[k] == runs[False][0][k] for rs in runs.values() for r in rs
               for k in ("final_val_loss", "final_train_loss"))
    print(f"default run{' with ' + ' '.join(args.set) if args.set else ''}: {args.epochs} epochs x "
          f"{args.repeats} alternating repeats, fresh processes")
    for native, name in ((False, "baseline kernels"), (True, "kernels for this CPU")):
        m = med[native]
        print(f"  {name:22s} step {m['ms_per_step']:6.1f} ms   eval {m['ms_per_eval']:6.1f} ms   "
              f"wall {m['wall_s']:6.1f} s")
    b, n = med[False], med[True]
    print(f"  baseline / this CPU: step {b['ms_per_step'] / n['ms_per_step']:.3f}   eval "
          f"{b['ms_per_eval'] / n['ms_per_eval']:.3f}   wall {b['wall_s'] / n['wall_s']:.3f}")
    print(f"  same final losses in every run: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
