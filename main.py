"""Train the grokking transformer: ``python main.py`` (see README), or ``main.train(config)`` from Python."""
import fastblas  # before mlx: loads an optimized BLAS on Linux

import argparse
import ast
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

# MLX orders each evaluation's operations breadth-first but only 20 wide by default, so the two halves
# of a split step (see Trainer) would run one after the other; a wide order interleaves them on the
# two CPU streams (49 vs 61 ms per default step here). MLX reads it at the first evaluation. It only
# changes the order in which independent operations run, never a result.
if sys.platform != "darwin":
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1000")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
from data import DataConfig  # noqa: E402
from models import ModelConfig  # noqa: E402
from optimizers import OptimConfig, build_optimizer  # noqa: E402

EVAL_CHUNK = 2048  # rows per evaluation forward pass (larger chunks: fewer, larger kernels; 512 took ~15% longer)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 512
    epochs: int = 150
    early_stop_val_acc: Optional[float] = None  # stop once validation accuracy reaches this
    cpu: bool = False  # force MLX's CPU device (Linux wheels have no other)

    def __post_init__(self):
        for key in ("batch_size", "epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be a positive integer")
        if self.early_stop_val_acc is not None and not 0 < self.early_stop_val_acc <= 1:
            raise ValueError(f"train.early_stop_val_acc={self.early_stop_val_acc} must be in (0, 1]")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 42

    def resolved(self) -> "Config":
        """The config with the optimizer's defaults filled in: what a run really used."""
        return dataclasses.replace(self, optim=self.optim.resolved())


# ---------------------------------------------------------------------------------------------
# One override mechanism for the CLI and the sweeps: dotted keys, type-checked, unknown keys rejected.

def _check_type(key: str, value, annotation):
    """Return ``value`` converted to ``annotation`` (int -> float allowed), or raise ValueError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} must be of type {annotation.__name__}")
    return value


def override(cfg, overrides: dict, prefix: str = ""):
    """A copy of the (nested, frozen) dataclass ``cfg`` with dotted keys such as ``optim.lr`` replaced.

    Values are type-checked against the fields; unknown keys raise ValueError listing the known ones.
    Every config's ``__post_init__`` validates the result.
    """
    groups: dict[str, dict] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        groups.setdefault(head, {})[rest] = value
    known = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for head, sub in groups.items():
        if head not in known:
            raise ValueError(f"unknown config key {prefix + head!r} (known: {', '.join(prefix + k for k in known)})")
        current = getattr(cfg, head)
        if dataclasses.is_dataclass(current):
            if "" in sub:
                raise ValueError(f"config key {prefix + head!r} is a section; set one of its fields, "
                                 f"e.g. {prefix + head}.<field>")
            changes[head] = override(current, sub, f"{prefix}{head}.")
        elif set(sub) != {""}:
            raise ValueError(f"unknown config key {prefix + head + '.' + next(k for k in sub if k)!r} "
                             f"({prefix + head} is not a section)")
        else:
            changes[head] = _check_type(prefix + head, sub[""], known[head].type)
    return dataclasses.replace(cfg, **changes)


def flatten(cfg) -> dict:
    """``{dotted_key: value}`` for every leaf field of a nested config."""
    return flatten_dict(dataclasses.asdict(cfg))


def flatten_dict(d: dict, prefix: str = "") -> dict:
    """``{dotted_key: value}`` for every leaf of a nested dict (e.g. a ``config.json``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_from_dict(d: dict) -> Config:
    """Inverse of ``dataclasses.asdict`` for ``Config`` (reads ``config.json``)."""
    return override(Config(), flatten_dict(d))


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace``: readers see all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def first_reaching(metrics: list[dict], threshold: float) -> tuple[Optional[int], Optional[int]]:
    """``(epoch, step)`` of the first evaluation with ``val_acc >= threshold``, or ``(None, None)``."""
    for row in metrics:
        if row["val_acc"] >= threshold:
            return row["epoch"], row["step"]
    return None, None


# ---------------------------------------------------------------------------------------------
# Training

def loss_and_correct(model, x, y, masks=None, logits=None):
    """Summed cross-entropy and the number of correct predictions of ``model`` on ``(x, y)`` (or of
    ``logits`` already computed for ``x``)."""
    logits = model(x, masks) if logits is None else logits
    return nn.losses.cross_entropy(logits, y, reduction="sum"), mx.sum(mx.argmax(logits, axis=1) == y)


def shared_prefixes(tokens: np.ndarray):
    """``(P, prefixes, inverse)`` for the prefix length ``P`` that leaves the fewest positions to compute
    when each distinct prefix ``prefixes[u]`` of ``tokens[:, :P]`` is computed once (``inverse`` maps
    rows to prefixes), or None when no prefix is shared enough to pay."""
    n, length = tokens.shape
    best_cost, best = n * length, None
    for p in range(1, length):
        prefixes, inverse = np.unique(tokens[:, :p], axis=0, return_inverse=True)
        cost = len(prefixes) * p + n * (length - p)
        if cost < 0.8 * best_cost:
            best_cost, best = cost, (p, prefixes, inverse.reshape(-1))
    return best


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the block with the optimized BLAS that ``fastblas`` loaded set to ``n`` threads (OpenBLAS)."""
    lib = ctypes.CDLL(fastblas.LOADED) if fastblas.LOADED else None
    if lib is None or not hasattr(lib, "openblas_set_num_threads"):
        yield
        return
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(n)
    try:
        yield
    finally:
        lib.openblas_set_num_threads(before)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse rather than give them back to the
    system. MLX's CPU allocator frees every step's activations, and each fresh page then costs a page
    fault (about a tenth of an evaluation's time here). Process-wide; a no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest value glibc accepts
    libc.mallopt(m_trim_threshold, 1 << 30)


class Trainer:
    """The model, the optimizer, the compiled train step and the evaluation of one run.

    ``train`` drives it and ``benchmarks/bench.py`` times it. On MLX's CPU backend outside macOS, where
    MLX runs each stream's elementwise work on one thread:

    - every batch is split in two halves whose summed-loss gradients are computed concurrently on two
      CPU streams (one BLAS thread each, see ``blas_threads``) and added: the whole batch's mean-loss
      gradient up to float rounding, with the whole batch's dropout masks;
    - those masks are drawn a step ahead on a third stream (the same random numbers, in the same order);
    - evaluation splits its rows over the two streams and computes prefixes shared by many rows once.

    Elsewhere it runs the plain single-stream step and evaluation.
    """

    def __init__(self, cfg: Config, optimizer: Optional[optim.Optimizer] = None):
        """``optimizer``: use this one instead of building ``cfg.optim`` (tests)."""
        mx.random.seed(cfg.seed)  # same seed and model config -> same initial weights for every optimizer
        self.model = model = models.Transformer(cfg.model, cfg.data.vocab_size)
        self.optimizer = optimizer = optimizer or build_optimizer(cfg.optim)
        optimizer.init(model.trainable_parameters())  # before compiling, so the step traces once
        self.state = [model.state, optimizer.state, mx.random.state]
        self.streams = [mx.new_stream(mx.cpu) for _ in range(2)] if models.use_fast_cpu_kernels() else None
        self.mask_stream = mx.new_stream(mx.cpu) if self.streams else None
        if self.streams:
            keep_freed_memory()
            if hasattr(optimizer, "streams"):  # QUAD: spread its parameter groups over the same streams
                optimizer.streams = self.streams

        def scaled_loss(model, x, y, masks, scale):
            loss, correct = loss_and_correct(model, x, y, masks)
            return loss * scale, loss, correct

        grad_fn = nn.value_and_grad(model, scaled_loss)

        # Each part of a batch is its own compiled call (traced per part, so per stream): one compiled
        # graph holding both parts would merge their identical constants into one stream's arrays, and
        # the other stream's elementwise kernels would then run unfused and strided.
        @partial(mx.compile, inputs=model.state)
        def gradients(x, y, masks, scale, part):
            params = model.trainable_parameters()
            with self.part_stream(part):  # the gradient of this part's share of the batch's mean loss
                (_, loss, correct), grads = grad_fn(model, x, y, masks, scale)
            model.update(params)  # value_and_grad leaves its traced copies in the model
            return loss, correct, grads

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def update(parts):
            loss, correct, grads = parts[0]
            for part_loss, part_correct, part_grads in parts[1:]:
                loss, correct = loss + part_loss, correct + part_correct
                grads = tree_map(mx.add, grads, part_grads)
            optimizer.update(model, grads)
            return loss, correct

        def step(x, y, masks):
            n = x.shape[0]
            return update([gradients(x[rows], y[rows], masks and [m[rows] for m in masks], 1 / n, part)
                           for part, rows in enumerate(self.parts(n))])

        @partial(mx.compile, inputs=model.state)
        def evaluate_part(x, y, part):
            with self.part_stream(part):
                return loss_and_correct(model, x, y)

        @partial(mx.compile, inputs=model.state)
        def evaluate_part_after(x, y, rows_prefix, past, part):  # x: the tokens after the prefixes
            with self.part_stream(part):
                past = [(keys[rows_prefix], values[rows_prefix]) for keys, values in past]
                return loss_and_correct(model, x, y, logits=model.logits_after(x, past))

        self._step, self._evaluate_part, self._evaluate_part_after = step, evaluate_part, evaluate_part_after
        self._prefix_keys_values = mx.compile(model.prefix_keys_values, inputs=model.state)
        self._prefix_plan = (None, None)  # (evaluation tokens, their shared_prefixes)

    def part_stream(self, part: int):
        """A context running its operations on the stream of part ``part`` (a no-op without streams)."""
        return mx.stream(self.streams[part]) if self.streams else contextlib.nullcontext()

    def parts(self, n: int) -> list:
        """The row slices of the parts of a batch of ``n`` rows: part ``i`` runs on stream ``i``."""
        if not self.streams or n < 2:
            return [slice(0, n)]
        return [slice(0, (n + 1) // 2), slice((n + 1) // 2, n)]

    def step(self, x, y):
        """One optimizer step on the batch ``(x, y)``: returns its summed loss and correct count (lazy)."""
        # Drawn outside the compiled step, so both halves can share the whole batch's masks.
        return self._step(x, y, self.model.dropout_masks(*x.shape))

    def epoch(self, x, y, order: mx.array, batch_size: int):
        """One optimizer step per batch of ``(x, y)`` rows taken in ``order``: the summed loss and correct
        count (lazy). Steps are queued, not waited for: metrics are read once per epoch."""
        loss_sum, correct_sum = mx.array(0.0), mx.array(0)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        masks = self._draw_masks(len(batches[0]), x.shape[1])
        for i, idx in enumerate(batches):
            # The next batch's masks (drawn in the order step() draws them) start now on a stream of
            # their own, to run beside this step rather than between two steps.
            upcoming = self._draw_masks(len(batches[i + 1]), x.shape[1]) if i + 1 < len(batches) else None
            loss, correct = self._step(x[idx], y[idx], masks)
            loss_sum, correct_sum = loss_sum + loss, correct_sum + correct
            mx.async_eval(self.state, loss_sum, correct_sum)
            masks = upcoming
        return loss_sum, correct_sum

    def _draw_masks(self, rows: int, length: int):
        with mx.stream(self.mask_stream) if self.streams else contextlib.nullcontext():
            masks = self.model.dropout_masks(rows, length)
        if masks:
            mx.async_eval(masks)
        return masks

    def shared_prefix_plan(self, tokens: np.ndarray):
        """``shared_prefixes(tokens)`` where evaluation shares prefixes, else None. It is part of the
        Linux CPU path, like the streams; elsewhere the plain evaluation is fast enough (and on MLX
        CUDA 0.32.4 this path hit a CUDA-graph error with a small model)."""
        return shared_prefixes(tokens) if self.streams else None

    def evaluate(self, x, y):
        """Summed loss and correct count over ``(x, y)`` (lazy): each part of the rows (see ``parts``) in
        chunks of at most ``EVAL_CHUNK`` rows on its own stream. On the Linux CPU path, prefixes shared by
        many rows (``a op`` of ``a op b =``) are computed once each (``Transformer.logits_after``)."""
        if self._prefix_plan[0] is not x:  # planned once per evaluation set, not once per epoch
            plan = self.shared_prefix_plan(np.asarray(x))
            if plan is not None:
                plan = (plan[0], mx.array(plan[1]), mx.array(plan[2]))
            self._prefix_plan = (x, plan)
        plan = self._prefix_plan[1]
        self.model.eval()
        if plan is not None:
            length, prefixes, inverse = plan
            past = self._prefix_keys_values(prefixes)
        totals = []
        for part, rows in enumerate(self.parts(len(y))):
            for i in range(rows.start, rows.stop, EVAL_CHUNK):
                chunk = slice(i, min(i + EVAL_CHUNK, rows.stop))
                if plan is None:
                    totals.append(self._evaluate_part(x[chunk], y[chunk], part))
                else:
                    totals.append(self._evaluate_part_after(x[chunk, length:], y[chunk], inverse[chunk], past, part))
        self.model.train()
        return tuple(sum(t[k] for t in totals) for k in range(2))


def train(config: Config, out_dir=None, progress: bool = True) -> dict:
    """Train one model as ``config`` says; write ``config.json``, ``metrics.jsonl`` and ``summary.json``
    to ``out_dir`` (when given) and return the summary."""
    cfg = config.resolved()
    if cfg.train.cpu:
        mx.set_default_device(mx.cpu)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)  # a run without a summary is unfinished
        write_json_atomic(out / "config.json", dataclasses.asdict(cfg))

    # Separate streams for the split and the shuffles: every optimizer and batch size sees the same split.
    x_train, y_train, x_val, y_val = data.split(cfg.data, np.random.default_rng([cfg.seed, 0]))
    shuffle_rng = np.random.default_rng([cfg.seed, 1])
    x_train, y_train, x_val, y_val = map(mx.array, (x_train, y_train, x_val, y_val))
    trainer = Trainer(cfg)
    with blas_threads(1) if trainer.streams else contextlib.nullcontext():
        return _train_loop(cfg, trainer, out, progress, shuffle_rng, x_train, y_train, x_val, y_val)


def _train_loop(cfg, trainer, out, progress, shuffle_rng, x_train, y_train, x_val, y_val) -> dict:
    n_train, batch_size = len(y_train), cfg.train.batch_size
    metrics, step, train_s, eval_s = [], 0, 0.0, 0.0
    metrics_file = open(out / "metrics.jsonl.partial", "w") if out is not None else None
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.train.epochs + 1), desc="train", unit="epoch", disable=not progress, file=sys.stdout)
    for epoch in bar:
        tick = time.perf_counter()
        order = mx.array(shuffle_rng.permutation(n_train))
        loss_sum, correct_sum = trainer.epoch(x_train, y_train, order, batch_size)
        step += math.ceil(n_train / batch_size)
        train_loss, train_acc = loss_sum.item() / n_train, correct_sum.item() / n_train
        tock = time.perf_counter()
        val_loss, val_correct = trainer.evaluate(x_val, y_val)
        val_loss, val_acc = val_loss.item() / len(y_val), val_correct.item() / len(y_val)
        train_s, eval_s = train_s + tock - tick, eval_s + time.perf_counter() - tock
        row = dict(epoch=epoch, step=step, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                   val_acc=val_acc, elapsed_s=round(time.perf_counter() - start, 4))
        metrics.append(row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
        bar.set_postfix(train_acc=f"{train_acc:.3f}", val_acc=f"{val_acc:.3f}", train_loss=f"{train_loss:.3f}",
                        val_loss=f"{val_loss:.3f}")
        if cfg.train.early_stop_val_acc is not None and val_acc >= cfg.train.early_stop_val_acc:
            break
    bar.close()
    wall_s = time.perf_counter() - start

    epochs_to_90, steps_to_90 = first_reaching(metrics, 0.90)
    epochs_to_99, steps_to_99 = first_reaching(metrics, 0.99)
    summary = dict(
        final_train_acc=metrics[-1]["train_acc"], final_val_acc=metrics[-1]["val_acc"],
        final_train_loss=metrics[-1]["train_loss"], final_val_loss=metrics[-1]["val_loss"],
        best_val_acc=max(r["val_acc"] for r in metrics),
        epochs_to_90=epochs_to_90, steps_to_90=steps_to_90, epochs_to_99=epochs_to_99, steps_to_99=steps_to_99,
        epochs_run=metrics[-1]["epoch"], steps_run=step, early_stopped=metrics[-1]["epoch"] < cfg.train.epochs,
        wall_s=round(wall_s, 3), ms_per_step=round(1e3 * train_s / step, 3),
        ms_per_eval=round(1e3 * eval_s / len(metrics), 3),
        parameter_count=models.parameter_count(cfg.model, cfg.data.vocab_size),
    )
    if out is not None:
        metrics_file.close()
        os.replace(out / "metrics.jsonl.partial", out / "metrics.jsonl")
        write_json_atomic(out / "summary.json", summary)  # written last: marks the run finished
    return summary


# ---------------------------------------------------------------------------------------------
# Command line

# The original repository's flag spellings, mapped to config keys.
FLAGS = {
    "--p": ("data.p", int), "--op": ("data.op", str), "--train-fraction": ("data.train_fraction", float),
    "--depth": ("model.depth", int), "--dim": ("model.dim", int), "--heads": ("model.heads", int),
    "--dropout": ("model.dropout", float), "--optimizer": ("optim.name", str), "--lr": ("optim.lr", float),
    "--weight-decay": ("optim.weight_decay", float), "--beta1": ("optim.beta1", float),
    "--beta2": ("optim.beta2", float), "--warmup": ("optim.warmup_steps", int),
    "--batch-size": ("train.batch_size", int), "--epochs": ("train.epochs", int),
    "--early-stop": ("train.early_stop_val_acc", float), "--seed": ("seed", int),
}
SHORT_FLAGS = {"--batch-size": ["-b", "--batch_size"], "--epochs": ["-e"]}


def parse_value(text: str):
    """A CLI value as a Python literal when it is one (``3e-3``, ``None``, ``True``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a transformer on a ∘ b mod p and watch it grok.",
        epilog="Any config field can also be set as --section.field=value, e.g. --optim.lr=3e-3 "
               "(sections: data, model, optim, train; see README).")
    for flag, (key, kind) in FLAGS.items():
        parser.add_argument(flag, *SHORT_FLAGS.get(flag, []), dest=key, type=kind, default=None,
                            metavar=key.split(".")[-1].upper(), help=f"sets {key}")
    parser.add_argument("--cpu", dest="train.cpu", action="store_const", const=True, default=None,
                        help="run on MLX's CPU device")
    parser.add_argument("--out", default="runs/default", help="run directory for results (default: %(default)s)")
    parser.add_argument("--plot", default="media/grokking.png",
                        help="figure path; a _dark variant is saved beside it (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw figures")
    return parser


def parse_args(argv) -> tuple[Config, argparse.Namespace]:
    """Build a Config from CLI arguments: the reference flags plus ``--section.field=value`` overrides."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = {k: v for k, v in vars(args).items() if "." in k or k == "seed"}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or "." not in token:
            parser.error(f"unrecognized argument {token!r}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                parser.error(f"{token} needs a value")
            value, i = rest[i + 1], i + 1
        overrides[key] = parse_value(value)
        i += 1
    return override(Config(), overrides), args


def main(argv=None) -> int:
    try:
        config, args = parse_args(argv)
        config.resolved()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = train(config, args.out)
    print(json.dumps({k: summary[k] for k in ("final_train_acc", "final_val_acc", "epochs_to_90", "epochs_to_99",
                                              "steps_to_99", "wall_s", "ms_per_step")}))
    print(f"results in {args.out}/")
    if not args.no_plot:
        import plot
        for path in plot.plot_run(args.out, args.plot):
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
