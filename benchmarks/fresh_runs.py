"""The harness of ``kernel_build.py``, ``blas_choice.py``, ``dropout_masks.py`` and ``fused_rope.py``: fresh
processes that each train the default run (``training.loop.train``, no files) for some epochs, two kinds of them
alternating, and their medians."""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMES = ("ms_per_step", "ms_per_eval", "wall_s")
METRICS = ("final_val_loss", "final_train_loss")

CHILD = """
import sys, json
sys.path.insert(0, {repo!r})
import fastblas
{setup}
from config import Config, override, parse_value
from training.loop import train
cfg = override(Config(), {{k: parse_value(v) if isinstance(v, str) else v for k, v in {overrides!r}.items()}})
summary = train(cfg, progress=False)
print(json.dumps({{"blas": fastblas.describe(), **{{k: summary[k] for k in {keys!r}}}}}))
"""


def parse_args(doc: str, argv=None):
    """``(args, overrides)`` from ``--repeats``, ``--epochs`` and ``--set KEY=VALUE`` (one-line errors)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
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
    return args, overrides


def measure(kind: str, setup: str, env: dict, overrides: dict) -> dict:
    """One fresh process of ``kind``: ``setup`` (code run after ``import fastblas``) and ``env`` (added to this
    process's environment; a None value removes the variable) make it that kind. Returns its times, final losses
    and BLAS."""
    code = CHILD.format(repo=str(REPO), setup=setup, overrides=overrides, keys=TIMES + METRICS)
    environment = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: a {kind} run failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternate(kinds: dict, args, overrides: dict) -> dict:
    """``{kind: [run, ...]}`` for ``kinds`` ``{kind: (setup, env)}``: one unmeasured epoch of each first (caches,
    kernel builds), then ``args.repeats`` rounds of ``args.epochs`` epochs, the kinds in turn."""
    for kind, (setup, env) in kinds.items():
        measure(kind, setup, env, {**overrides, "train.epochs": 1})
    runs = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind, (setup, env) in kinds.items():
            runs[kind].append(measure(kind, setup, env, {**overrides, "train.epochs": args.epochs}))
    return runs


def medians(runs: list) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in TIMES}


def same_metrics(runs: list) -> bool:
    """Whether every run of ``runs`` ended with the same losses, to the last bit."""
    return all(r[k] == runs[0][k] for r in runs for k in METRICS)


def report(runs: dict, args) -> None:
    """Print each kind's medians, whether its runs agreed to the last bit and its BLAS, then the first kind's
    times over each other kind's."""
    print(f"default run{' with ' + ' '.join(args.set) if args.set else ''}: {args.epochs} epochs x "
          f"{args.repeats} alternating repeats, fresh processes")
    med = {kind: medians(rs) for kind, rs in runs.items()}
    width = max(map(len, runs))
    for kind, m in med.items():
        print(f"  {kind:{width}s}  step {m['ms_per_step']:6.1f} ms   eval {m['ms_per_eval']:6.1f} ms   "
              f"wall {m['wall_s']:6.1f} s   same metrics in every run: {same_metrics(runs[kind])}   "
              f"({runs[kind][0]['blas']})")
    (first, a), *others = med.items()
    for other, b in others:
        print(f"  {first} / {other}: step {a['ms_per_step'] / b['ms_per_step']:.3f}   eval "
              f"{a['ms_per_eval'] / b['ms_per_eval']:.3f}   wall {a['wall_s'] / b['wall_s']:.3f}")


def compare(kinds: dict, args, overrides: dict, same_across_kinds: bool = False) -> int:
    """``alternate`` then ``report`` the ``kinds``; ``same_across_kinds``: also whether all runs of every kind ended
    with the same losses (kinds that compute the same bits)."""
    runs = alternate(kinds, args, overrides)
    report(runs, args)
    if same_across_kinds:
        print(f"  the same final losses from both kinds: {same_metrics([r for rs in runs.values() for r in rs])}")
    return 0
