"""The one training loop: ``train(config, out_dir) -> summary``. The CLI, the sweeps and the benchmarks call it.

Epochs of shuffled batches until the budget (epochs or optimizer steps) is spent. The validation split is
evaluated after every epoch, or every ``train.eval_every`` steps, and each evaluation is a row of
``metrics.jsonl``. The loop stops between batches wherever something is due — an evaluation, an epoch's
end, a hook's step (``Hook.next_stop``) — and calls every hook there (checkpoints, snapshots). With a
checkpoint in the run directory, ``train(..., resume=True)`` continues from it exactly: the same batches,
dropout masks and sums, so the metrics equal the uninterrupted run's.
"""
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

import data
import fastblas
import models
from config import Config, config_hash, flatten_dict
from training import checkpoints, rundir
from training.speed import available as speed_layer_available
from training.speed.trainer import FastTrainer
from training.trainer import Trainer

THRESHOLDS = (0.9, 0.95, 0.99)  # validation accuracies whose first crossing the summary records


def build_trainer(cfg: Config) -> Trainer:
    """The trainer for this platform, chosen once: the speed layer on MLX's Linux CPU backend, else the plain one."""
    return FastTrainer(cfg) if speed_layer_available() else Trainer(cfg)


@dataclasses.dataclass
class Loop:
    """The state of a run between two batches: what hooks read and what a checkpoint holds."""
    cfg: Config
    trainer: Trainer
    out: Optional[Path]
    shuffle_rng: np.random.Generator
    steps_per_epoch: int
    budget: int                      # optimizer steps
    step: int = 0
    epochs_started: int = 0
    position: int = 0                # batches of the current epoch done
    order: Optional[mx.array] = None  # the current epoch's permutation of the training rows
    totals: Optional[tuple] = None   # summed train loss and correct count since the last evaluation (lazy)
    rows_seen: int = 0               # training rows behind ``totals``
    metrics: list = dataclasses.field(default_factory=list)
    finished: bool = False           # budget spent, early stop or divergence
    diverged: bool = False
    train_s: float = 0.0
    eval_s: float = 0.0
    elapsed_before: float = 0.0      # wall seconds of the run before a resume
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def epoch(self):
        """Epochs done, as a fraction between epoch ends (an int at one)."""
        epochs = self.step / self.steps_per_epoch
        return int(epochs) if epochs == int(epochs) else round(epochs, 4)

    @property
    def epoch_end(self) -> bool:
        return self.position == self.steps_per_epoch


class Hook:
    """Joins the loop: ``next_stop`` asks it to stop inside an epoch at a step; ``after`` runs at every stop;
    ``at_end`` once the run is over, before ``summary.json`` marks it finished."""

    def next_stop(self, loop: Loop) -> Optional[int]:
        return None

    def after(self, loop: Loop) -> None:
        pass

    def at_end(self, loop: Loop) -> None:
        pass


class Checkpointer(Hook):
    """A checkpoint every ``interval`` (``checkpoints.Interval``) and at the end."""

    def __init__(self, interval: Optional[checkpoints.Interval]):
        self.interval = interval

    def next_stop(self, loop):
        return self.interval.next_stop(loop.step, loop.budget) if self.interval else None

    def after(self, loop):
        if loop.step and self.interval and self.interval.due(loop.step, loop.epoch_end, loop.step // loop.steps_per_epoch,
                                               loop.budget):
            save(loop)

    def at_end(self, loop):
        last = checkpoints.checkpoint_dirs(loop.out)
        if last and last[-1].name == f"step_{loop.step:09d}":
            checkpoints.mark_finished(last[-1])
        else:
            save(loop)


class Snapshotter(Hook):
    """The model's parameters every ``interval``, at the start (step 0) and at the end."""

    def __init__(self, interval: checkpoints.Interval):
        self.interval = interval

    def next_stop(self, loop):
        return self.interval.next_stop(loop.step, loop.budget)

    def after(self, loop):
        if loop.step == 0 or self.interval.due(loop.step, loop.epoch_end, loop.step // loop.steps_per_epoch,
                                               loop.budget):
            checkpoints.save_snapshot(loop.out, loop.trainer.model, loop.epoch, loop.step)

    def at_end(self, loop):
        checkpoints.save_snapshot(loop.out, loop.trainer.model, loop.epoch, loop.step)


def save(loop: Loop) -> Path:
    """A checkpoint of ``loop`` as it is now."""
    trainer, (loss_sum, correct_sum) = loop.trainer, loop.totals or (mx.array(0.0), mx.array(0))
    arrays = {"loss_sum": loss_sum, "correct_sum": correct_sum}
    if loop.order is not None:
        arrays["order"] = loop.order
    key = [int(v) for v in mx.random.state[0].tolist()]
    meta = dict(config_hash=config_hash(loop.cfg), epochs_started=loop.epochs_started, position=loop.position,
                rows_seen=loop.rows_seen, metrics_rows=len(loop.metrics), finished=loop.finished,
                diverged=loop.diverged, random_key=key, shuffle_rng=loop.shuffle_rng.bit_generator.state,
                train_s=loop.train_s, eval_s=loop.eval_s, elapsed_s=loop.elapsed_before + loop_clock(loop))
    return checkpoints.save_checkpoint(loop.out, loop.step, dict(tree_flatten(trainer.model.parameters())),
                                       trainer.optimizer.state, arrays, meta)


def loop_clock(loop: Loop) -> float:
    return time.perf_counter() - loop.started


def restore(loop: Loop, checkpoint: checkpoints.Checkpoint) -> None:
    """Put ``loop`` (built afresh for the same config) where ``checkpoint`` left the run."""
    meta, arrays = checkpoint.meta, checkpoint.loop_arrays
    if meta["config_hash"] != config_hash(loop.cfg):
        raise checkpoints.CheckpointError(f"{checkpoint.path} belongs to another config "
                                          f"(hash {meta['config_hash']}, this run {config_hash(loop.cfg)})")
    checkpoints.check_parameters(checkpoint, loop.trainer.model)
    loop.trainer.load_state(checkpoint.parameters, checkpoint.optimizer_state)
    hi, lo = meta["random_key"]
    mx.random.seed((hi << 32) | lo)  # the key itself: seed(s) sets it to (s >> 32, s & 0xffffffff)
    loop.shuffle_rng.bit_generator.state = meta["shuffle_rng"]
    loop.step, loop.epochs_started, loop.position = meta["step"], meta["epochs_started"], meta["position"]
    loop.order = arrays.get("order")
    loop.rows_seen = meta["rows_seen"]
    loop.totals = (arrays["loss_sum"], arrays["correct_sum"]) if meta["rows_seen"] else None
    loop.finished, loop.diverged = meta["finished"], meta["diverged"]
    loop.train_s, loop.eval_s, loop.elapsed_before = meta["train_s"], meta["eval_s"], meta["elapsed_s"]
    loop.metrics = read_rows(loop.out)[:meta["metrics_rows"]]
    if len(loop.metrics) != meta["metrics_rows"]:
        raise checkpoints.CheckpointError(f"{loop.out}: metrics.jsonl has {len(loop.metrics)} rows, "
                                          f"the checkpoint needs {meta['metrics_rows']}")


def read_rows(out: Path) -> list:
    """The metric rows written so far: the finished file, else the partial one (its last line may be cut)."""
    for name in (rundir.METRICS, rundir.PARTIAL):
        if (out / name).exists():
            rows = []
            for line in (out / name).read_text().splitlines():
                try:
                    rows.append(rundir.parse_row(line))
                except ValueError:
                    break
            return rows
    return []


def config_differences(saved: dict, cfg: Config) -> list:
    """``key: old -> new`` for each config key where the saved ``config.json`` and ``cfg`` differ."""
    old, new = flatten_dict(saved), flatten_dict(dataclasses.asdict(cfg.resolved()))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def train(config: Config, out_dir=None, progress: bool = True, hooks=(), checkpoint_every=None,
          snapshot_every=None, resume: bool = False, require_checkpoint: bool = False) -> dict:
    """Train one model as ``config`` says; write ``config.json``, ``metrics.jsonl`` and ``summary.json``
    to ``out_dir`` (when given) and return the summary.

    ``checkpoint_every`` / ``snapshot_every``: ``checkpoints.Interval``s (None: none). ``resume``: continue
    from the newest good checkpoint in ``out_dir`` when there is one, else start afresh (CheckpointError
    instead with ``require_checkpoint``).
    """
    cfg = config.resolved()
    if cfg.train.cpu:
        mx.set_default_device(mx.cpu)
    out = Path(out_dir) if out_dir is not None else None
    checkpoint = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = checkpoints.latest_checkpoint(out) if resume else None
        if checkpoint is None and require_checkpoint:
            raise checkpoints.CheckpointError(f"no good checkpoint in {out} (nothing to resume)")
        if checkpoint is None:
            for stale in (rundir.SUMMARY, rundir.METRICS):  # a run without a summary is unfinished
                (out / stale).unlink(missing_ok=True)
            checkpoints.remove_all(out)
        rundir.write_json_atomic(out / rundir.CONFIG, dataclasses.asdict(cfg))
    hooks = list(hooks)
    if out is not None and checkpoint_every is not None:
        hooks.append(Checkpointer(checkpoint_every))
    if out is not None and snapshot_every is not None:
        hooks.append(Snapshotter(snapshot_every))

    # Separate streams for the split and the shuffles: every optimizer and batch size sees the same split.
    x_train, y_train, x_val, y_val = data.split(cfg.data, np.random.default_rng([cfg.seed, 0]))
    shuffle_rng = np.random.default_rng([cfg.seed, 1])
    x_train, y_train, x_val, y_val = map(mx.array, (x_train, y_train, x_val, y_val))
    steps_per_epoch = math.ceil(len(y_train) / cfg.train.batch_size)
    budget = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    loop = Loop(cfg, build_trainer(cfg), out, shuffle_rng, steps_per_epoch, budget)
    if checkpoint is not None:
        restore(loop, checkpoint)
    loop.started = time.perf_counter()
    with loop.trainer.running():
        return _run(loop, hooks, progress, x_train, y_train, x_val, y_val, fresh=checkpoint is None)


def _run(loop: Loop, hooks, progress, x_train, y_train, x_val, y_val, fresh: bool) -> dict:
    cfg, trainer = loop.cfg, loop.trainer
    n_train, batch_size, eval_every = len(y_train), cfg.train.batch_size, cfg.train.eval_every
    evaluate = trainer.evaluator(x_val, y_val)
    writer = rundir.MetricsWriter(loop.out, loop.metrics) if loop.out is not None else None
    if fresh:
        for hook in hooks:  # step 0
            hook.after(loop)
    bar = tqdm(total=loop.budget, initial=loop.step, desc="train", unit="step", disable=not progress,
               file=sys.stdout)
    while not loop.finished and loop.step < loop.budget:
        tick = time.perf_counter()
        if loop.order is None or loop.epoch_end:
            loop.order = mx.array(loop.shuffle_rng.permutation(n_train))
            loop.epochs_started, loop.position = loop.epochs_started + 1, 0
        stops = [loop.step + loop.steps_per_epoch - loop.position, loop.budget]
        if eval_every:
            stops.append((loop.step // eval_every + 1) * eval_every)
        stops += [s for s in (hook.next_stop(loop) for hook in hooks) if s is not None and s > loop.step]
        n = min(stops) - loop.step
        rows = loop.order[loop.position * batch_size:min((loop.position + n) * batch_size, n_train)]
        loop.totals = trainer.steps(x_train, y_train, rows, batch_size, loop.totals)
        loop.rows_seen += len(rows)
        loop.step, loop.position = loop.step + n, loop.position + n
        bar.update(n)
        if loop.step == loop.budget or (loop.step % eval_every == 0 if eval_every else loop.epoch_end):
            loss_sum, correct_sum = loop.totals
            train_loss, train_acc = loss_sum.item() / loop.rows_seen, correct_sum.item() / loop.rows_seen
            tock = time.perf_counter()
            val_loss, val_correct = evaluate()
            val_loss, val_acc = val_loss.item() / len(y_val), val_correct.item() / len(y_val)
            loop.train_s, loop.eval_s = loop.train_s + tock - tick, loop.eval_s + time.perf_counter() - tock
            row = dict(epoch=loop.epoch, step=loop.step, train_loss=train_loss, train_acc=train_acc,
                       val_loss=val_loss, val_acc=val_acc,
                       elapsed_s=round(loop.elapsed_before + loop_clock(loop), 4))
            loop.metrics.append(rundir.finite_row(row))
            if writer is not None:
                writer.write(loop.metrics[-1])
            loop.totals, loop.rows_seen = None, 0
            bar.set_postfix(train_acc=f"{train_acc:.3f}", val_acc=f"{val_acc:.3f}", train_loss=f"{train_loss:.3f}",
                            val_loss=f"{val_loss:.3f}")
            loop.diverged = not all(map(math.isfinite, (train_loss, val_loss)))
            early = cfg.train.early_stop_val_acc is not None and val_acc >= cfg.train.early_stop_val_acc
            loop.finished = loop.diverged or early or loop.step == loop.budget
        else:
            loop.train_s += time.perf_counter() - tick
        for hook in hooks:
            hook.after(loop)
    bar.close()
    loop.finished = True
    for hook in hooks:
        hook.at_end(loop)
    summary = dict(summarize(loop), platform=platform_info(trainer))
    if writer is not None:
        writer.finish()
    if loop.out is not None:
        rundir.write_json_atomic(loop.out / rundir.SUMMARY, summary)  # written last: marks the run finished
    return summary


def platform_info(trainer: Trainer) -> dict:
    """What the run's timings were measured on: MLX, its device, the trainer, the BLAS (with OpenBLAS's kernels), the
    CPU and its cores."""
    cpu = next((line.partition(":")[2].strip() for line in fastblas.cpuinfo().splitlines()
                if line.startswith("model name")), None) or platform.processor() or platform.machine()
    return dict(mlx=mx.__version__, device=str(mx.default_device()), trainer=type(trainer).__name__,
                blas=fastblas.describe(), cpu=cpu, cores=os.cpu_count())


def summarize(loop: Loop) -> dict:
    """The run's ``summary.json`` but its ``platform`` (``platform_info``, added by ``_run``)."""
    metrics, cfg = loop.metrics, loop.cfg
    reached = {}
    for threshold in THRESHOLDS:  # seconds: the elapsed_s of that evaluation (wall clock, evaluations included)
        percent = round(100 * threshold)
        epoch, step, seconds = rundir.when(rundir.first_row(metrics, threshold))
        reached.update({f"epochs_to_{percent}": epoch, f"steps_to_{percent}": step, f"seconds_to_{percent}": seconds})
    sustained = rundir.when(rundir.sustained_row(metrics, 0.95))
    last = metrics[-1]
    return dict(
        final_train_acc=last["train_acc"], final_val_acc=last["val_acc"],
        final_train_loss=last["train_loss"], final_val_loss=last["val_loss"],
        best_val_acc=max(r["val_acc"] for r in metrics if r["val_acc"] is not None),
        **reached, epochs_sustained_95=sustained[0], steps_sustained_95=sustained[1],
        seconds_sustained_95=sustained[2],
        epochs_run=last["epoch"], steps_run=loop.step, early_stopped=loop.step < loop.budget and not loop.diverged,
        diverged=loop.diverged, diverged_at_epoch=last["epoch"] if loop.diverged else None,
        wall_s=round(loop.elapsed_before + loop_clock(loop), 3),
        ms_per_step=round(1e3 * loop.train_s / max(loop.step, 1), 3),
        ms_per_eval=round(1e3 * loop.eval_s / len(metrics), 3),
        parameter_count=models.parameter_count(cfg.model, cfg.data.vocab_size),
    )
