"""What the optional MKL (``requirements-mkl.txt``) saves against OpenBLAS (``fastblas.py``):

    python benchmarks/blas_choice.py [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

Each measurement is a fresh process (``GROKKING_BLAS=openblas`` or ``mkl``) that trains the default run
(``training.loop.train``, no files) for ``--epochs`` epochs; the two alternate ``--repeats`` times after one
unmeasured epoch each. It prints the median ms per step and per evaluation of each, their ratios, and whether each
library gave the same metrics in all its runs (the libraries differ from each other by float rounding).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("openblas", "mkl")

CHILD = """
import sys, json
sys.path.insert(0, {repo!r})
import fastblas
from config import Config, override, parse_value
from training.loop import train
cfg = override(Config(), {{k: parse_value(v) if isinstance(v, str) else v for k, v in {overrides!r}.items()}})
summary = train(cfg, progress=False)
print(json.dumps({{"blas": fastblas.LOADED, **{{k: summary[k] for k in ("ms_per_step", "ms_per_eval", "wall_s",
                                                                       "final_val_loss", "final_train_loss")}}}}))
"""


def measure(kind: str, overrides: dict) -> dict:
    code = CHILD.format(repo=str(REPO), overrides=overrides)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "GROKKING_BLAS": kind})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: a run with {kind} failed: {last}")
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
    names = {kind: measure(kind, {**overrides, "train.epochs": 1})["blas"] for kind in KINDS}  # warm-up
    runs = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            runs[kind].append(measure(kind, {**overrides, "train.epochs": args.epochs}))
    med = {kind: {k: statistics.median(r[k] for r in rs) for k in ("ms_per_step", "ms_per_eval", "wall_s")}
           for kind, rs in runs.items()}
    print(f"default run{' with ' + ' '.join(args.set) if args.set else ''}: {args.epochs} epochs x "
          f"{args.repeats} alternating repeats, fresh processes")
    for kind in KINDS:
        m, same = med[kind], all(r[k] == runs[kind][0][k] for r in runs[kind]
                                 for k in ("final_val_loss", "final_train_loss"))
        print(f"  {kind:9s} step {m['ms_per_step']:6.1f} ms   eval {m['ms_per_eval']:6.1f} ms   "
              f"wall {m['wall_s']:6.1f} s   same metrics in every run: {same}   ({names[kind]})")
    o, k = med["openblas"], med["mkl"]
    print(f"  openblas / mkl: step {o['ms_per_step'] / k['ms_per_step']:.3f}   eval "
          f"{o['ms_per_eval'] / k['ms_per_eval']:.3f}   wall {o['wall_s'] / k['wall_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
