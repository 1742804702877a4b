"""Run ``train`` and SIGKILL the process at a chosen point: ``python tests/harness/killed_run.py CONFIG_JSON OUT POINT``.

POINT: ``steps:N`` (as the N-th batch of steps starts), ``save:N`` (before the N-th safetensors file is written:
inside a checkpoint write) or ``summary`` (after metrics.jsonl is complete, before summary.json).
"""
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import fastblas  # noqa: E402,F401

import mlx.core as mx  # noqa: E402

from config import Config, override  # noqa: E402
from training import loop, rundir  # noqa: E402
from training.checkpoints import Interval  # noqa: E402


def kill_on(count: int):
    calls = [0]

    def hit():
        calls[0] += 1
        if calls[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
    return hit


def main(config_json: str, out: str, point: str, checkpoint_every: str) -> None:
    kind, _, n = point.partition(":")
    if kind == "steps":
        hit, build = kill_on(int(n)), loop.build_trainer

        def build_trainer(cfg):
            trainer = build(cfg)
            steps = trainer.steps
            trainer.steps = lambda *args: (hit(), steps(*args))[1]
            return trainer
        loop.build_trainer = build_trainer
    elif kind == "save":
        hit, save = kill_on(int(n)), mx.save_safetensors
        mx.save_safetensors = lambda *args, **kwargs: (hit(), save(*args, **kwargs))[1]
    elif kind == "summary":
        write = rundir.write_json_atomic

        def write_json_atomic(path, obj):
            if Path(path).name == rundir.SUMMARY:
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, obj)
        rundir.write_json_atomic = write_json_atomic
    loop.train(override(Config(), json.loads(config_json)), out, progress=False,
               checkpoint_every=Interval.parse(checkpoint_every, "checkpoint_every"))


if __name__ == "__main__":
    main(*sys.argv[1:])
