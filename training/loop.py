"""The one training loop: ``train(config, out_dir) -> summary``. The CLI, the sweeps and the benchmarks call it.

Epochs of shuffled batches; after each epoch the whole validation split is evaluated, a row is written to
``metrics.jsonl``, and every hook is called with the loop (``Hook``), which is how checkpoints and
snapshots join in.
"""
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from tqdm import tqdm

import data
import models
from config import Config
from training import rundir
from training.speed import available as speed_layer_available
from training.speed.trainer import FastTrainer
from training.trainer import Trainer


def build_trainer(cfg: Config) -> Trainer:
    """The trainer for this platform, chosen once: the speed layer on MLX's Linux CPU backend, else the plain one."""
    return FastTrainer(cfg) if speed_layer_available() else Trainer(cfg)


class Hook:
    """Called by the loop: ``after_evaluation`` after each evaluation row, ``at_end`` with the summary."""

    def after_evaluation(self, loop: "Loop") -> None:
        pass

    def at_end(self, loop: "Loop", summary: dict) -> None:
        pass


@dataclasses.dataclass
class Loop:
    """The state of a run as the loop goes: what hooks read."""
    cfg: Config
    trainer: Trainer
    out: Optional[Path]
    epoch: int = 0
    step: int = 0
    metrics: list = dataclasses.field(default_factory=list)


def train(config: Config, out_dir=None, progress: bool = True, hooks=()) -> dict:
    """Train one model as ``config`` says; write ``config.json``, ``metrics.jsonl`` and ``summary.json``
    to ``out_dir`` (when given) and return the summary."""
    cfg = config.resolved()
    if cfg.train.cpu:
        mx.set_default_device(mx.cpu)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / rundir.SUMMARY).unlink(missing_ok=True)  # a run without a summary is unfinished
        rundir.write_json_atomic(out / rundir.CONFIG, dataclasses.asdict(cfg))

    # Separate streams for the split and the shuffles: every optimizer and batch size sees the same split.
    x_train, y_train, x_val, y_val = data.split(cfg.data, np.random.default_rng([cfg.seed, 0]))
    shuffle_rng = np.random.default_rng([cfg.seed, 1])
    x_train, y_train, x_val, y_val = map(mx.array, (x_train, y_train, x_val, y_val))
    loop = Loop(cfg, build_trainer(cfg), out)
    with loop.trainer.running():
        return _run(loop, hooks, progress, shuffle_rng, x_train, y_train, x_val, y_val)


def _run(loop: Loop, hooks, progress, shuffle_rng, x_train, y_train, x_val, y_val) -> dict:
    cfg, trainer = loop.cfg, loop.trainer
    n_train, batch_size = len(y_train), cfg.train.batch_size
    evaluate = trainer.evaluator(x_val, y_val)
    writer = rundir.MetricsWriter(loop.out) if loop.out is not None else None
    train_s = eval_s = 0.0
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.train.epochs + 1), desc="train", unit="epoch", disable=not progress, file=sys.stdout)
    for epoch in bar:
        tick = time.perf_counter()
        order = mx.array(shuffle_rng.permutation(n_train))
        loss_sum, correct_sum = trainer.epoch(x_train, y_train, order, batch_size)
        loop.epoch, loop.step = epoch, loop.step + math.ceil(n_train / batch_size)
        train_loss, train_acc = loss_sum.item() / n_train, correct_sum.item() / n_train
        tock = time.perf_counter()
        val_loss, val_correct = evaluate()
        val_loss, val_acc = val_loss.item() / len(y_val), val_correct.item() / len(y_val)
        train_s, eval_s = train_s + tock - tick, eval_s + time.perf_counter() - tock
        row = dict(epoch=epoch, step=loop.step, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                   val_acc=val_acc, elapsed_s=round(time.perf_counter() - start, 4))
        loop.metrics.append(row)
        if writer is not None:
            writer.write(row)
        for hook in hooks:
            hook.after_evaluation(loop)
        bar.set_postfix(train_acc=f"{train_acc:.3f}", val_acc=f"{val_acc:.3f}", train_loss=f"{train_loss:.3f}",
                        val_loss=f"{val_loss:.3f}")
        if cfg.train.early_stop_val_acc is not None and val_acc >= cfg.train.early_stop_val_acc:
            break
    bar.close()
    summary = summarize(loop, wall_s=time.perf_counter() - start, train_s=train_s, eval_s=eval_s)
    if writer is not None:
        writer.finish()
    for hook in hooks:
        hook.at_end(loop, summary)
    if loop.out is not None:
        rundir.write_json_atomic(loop.out / rundir.SUMMARY, summary)  # written last: marks the run finished
    return summary


def summarize(loop: Loop, wall_s: float, train_s: float, eval_s: float) -> dict:
    """The run's ``summary.json``."""
    metrics, cfg = loop.metrics, loop.cfg
    epochs_to_90, steps_to_90 = rundir.first_reaching(metrics, 0.90)
    epochs_to_99, steps_to_99 = rundir.first_reaching(metrics, 0.99)
    last = metrics[-1]
    return dict(
        final_train_acc=last["train_acc"], final_val_acc=last["val_acc"],
        final_train_loss=last["train_loss"], final_val_loss=last["val_loss"],
        best_val_acc=max(r["val_acc"] for r in metrics),
        epochs_to_90=epochs_to_90, steps_to_90=steps_to_90, epochs_to_99=epochs_to_99, steps_to_99=steps_to_99,
        epochs_run=last["epoch"], steps_run=loop.step, early_stopped=last["epoch"] < cfg.train.epochs,
        wall_s=round(wall_s, 3), ms_per_step=round(1e3 * train_s / loop.step, 3),
        ms_per_eval=round(1e3 * eval_s / len(metrics), 3),
        parameter_count=models.parameter_count(cfg.model, cfg.data.vocab_size),
    )
