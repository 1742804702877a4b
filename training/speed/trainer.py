"""FastTrainer: the Trainer's step and evaluation on MLX's CPU backend outside macOS.

There MLX runs each stream's elementwise work on one thread, so:

- every batch is split in two halves whose summed-loss gradients are computed concurrently on two CPU
  streams (one BLAS thread each, ``blas_threads``) and added: the whole batch's mean-loss gradient up to
  float rounding, with the whole batch's dropout masks;
- those masks are drawn a step ahead, by native code on a thread of its own where a compiler builds it
  (``masks.NativeMasks``), else on a third stream (the same random numbers, in the same order, either way);
- evaluation splits its rows over the two streams and computes prefixes shared by many rows once;
- glibc keeps freed memory for reuse (``keep_freed_memory``);
- subnormal floats are flushed to zero on x86-64 (``flush_subnormals``), which only changes values below
  1.2e-38 and keeps late, weight-decay-free training from slowing down severalfold;
- MLX's fused kernels are built for this CPU (``compiler.build_kernels_for_this_cpu``);
- QUAD fits its preconditioner and steps its momentum with the native primitives of ``quad_fit`` where they
  build, its parameter groups spread over the two streams; every other optimizer's per-parameter updates are spread
  over them alike (``updates_on_streams``).
"""
import contextlib
import ctypes
import platform
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

import fastblas
from config import Config
from optimizers.quad import QUAD
from training.speed import quad_fit
from training.speed.compiler import build_kernels_for_this_cpu
from training.speed.masks import NativeMasks
from training.speed.model import FastModel
from training.trainer import EVAL_CHUNK, Trainer


@contextlib.contextmanager
def blas_threads(n: int):
    """Run the block with the optimized BLAS that ``fastblas`` loaded set to ``n`` threads (OpenBLAS, MKL)."""
    control = fastblas.threads()
    if control is None:
        yield
        return
    get, put = control
    before = get()
    put(n)
    try:
        yield
    finally:
        put(before)


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse rather than give them back to the
    system: MLX's CPU allocator frees every step's activations, and each fresh page then costs a page
    fault. Process-wide; a no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)  # the largest value glibc accepts
    libc.mallopt(m_trim_threshold, 1 << 30)


MXCSR_FLUSH_TO_ZERO, MXCSR_DENORMALS_ARE_ZERO = 0x8000, 0x0040
MXCSR_OFFSET = 28  # glibc's x86-64 fenv_t: the x87 environment (28 bytes), then the SSE control word


def flush_subnormals() -> bool:
    """Have this thread, and every thread it starts from now on (they inherit it), treat float results and
    inputs below 1.2e-38 as zero (SSE/AVX FTZ and DAZ), as GPUs do by default. Long runs without weight
    decay drive logit gaps past 87, where exp underflows to subnormals, and subnormal operands make GEMM
    and elementwise kernels several times slower. Values of normal size are untouched. x86-64 glibc only;
    returns whether it was set."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        libm = ctypes.CDLL("libm.so.6")
    except OSError:
        return False
    env = (ctypes.c_uint8 * 32)()  # sizeof(fenv_t) on x86-64
    if libm.fegetenv(env) != 0:
        return False
    word = int.from_bytes(bytes(env[MXCSR_OFFSET:MXCSR_OFFSET + 4]), "little")
    word |= MXCSR_FLUSH_TO_ZERO | MXCSR_DENORMALS_ARE_ZERO
    env[MXCSR_OFFSET:MXCSR_OFFSET + 4] = word.to_bytes(4, "little")
    return libm.fesetenv(env) == 0


@contextlib.contextmanager
def updates_on_streams(optimizer: optim.Optimizer, parameters: dict, streams: list):
    """Within the block, ``optimizer`` (each of a ``MultiOptimizer``'s) runs each parameter's ``apply_single`` on one
    of ``streams``: the parameters of one shape and dtype together, the largest such class first, each to the least
    loaded stream (by elements), as QUAD spreads its groups. The parameters are known by identity, the leaves of
    ``parameters`` (those ``Optimizer.update(model, ...)`` passes on); any other runs on the stream in use. The same
    operations, so the same bits, as on one stream: MLX runs each stream's element-wise work on one thread, and
    Muon's orthogonalisation is ~20 products per matrix.

    Whole classes, because ``mx.compile`` merges identical nodes across streams: an update's scalar broadcast to a
    shape serves every parameter of that shape, from one stream, and the other stream's fused update kernels then
    take it as a materialized broadcast input and run MLX's strided path (AdamW's, ~2.8x slower per element)."""
    classes = {}
    for _, parameter in tree_flatten(parameters):
        classes.setdefault((tuple(parameter.shape), parameter.dtype), []).append(parameter)
    sizes = {key: sum(p.size for p in members) for key, members in classes.items()}
    load, stream_of = [0] * len(streams), {}
    for key in sorted(classes, key=lambda key: -sizes[key]):
        j = load.index(min(load))
        load[j] += sizes[key]
        stream_of.update((id(p), streams[j]) for p in classes[key])
    targets = getattr(optimizer, "optimizers", [optimizer])
    own = [vars(t).get("apply_single") for t in targets]  # an instance's own, else None (the class's)

    def on_stream(apply_single):
        def apply(gradient, parameter, state):
            stream = stream_of.get(id(parameter))
            with mx.stream(stream) if stream is not None else contextlib.nullcontext():
                return apply_single(gradient, parameter, state)
        return apply
    for t in targets:
        t.apply_single = on_stream(t.apply_single)
    try:
        yield stream_of
    finally:
        for t, apply_single in zip(targets, own):
            if apply_single is None:
                del t.apply_single
            else:
                t.apply_single = apply_single


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


class FastTrainer(Trainer):
    """The Trainer's interface; the model's parameters run through ``FastModel``."""

    def __init__(self, cfg: Config, optimizer: Optional[optim.Optimizer] = None, streams: int = 2,
                 native_masks: bool = True, native_quad: bool = True, spread_updates: bool = True):
        """``streams``: how many CPU streams a batch and an evaluation are split over (1: no split);
        ``native_masks``: draw the dropout masks with ``NativeMasks`` where it builds (else with MLX);
        ``native_quad``: QUAD's preconditioner fits and momentum by ``quad_fit``'s primitives where they build;
        ``spread_updates``: the optimizer's updates spread over the streams (QUAD's groups, others' parameters), else
        on the default stream."""
        build_kernels_for_this_cpu()  # before the first fused kernel is built
        super().__init__(cfg, optimizer)
        model, optimizer = self.model, self.optimizer
        self.fast = fast = FastModel(model, cfg.model)
        flush_subnormals()  # before the streams start their threads, which inherit it
        self.streams = [mx.new_stream(mx.cpu) for _ in range(streams)]
        self.native_masks = NativeMasks.build() if native_masks and cfg.model.dropout > 0 else None
        self.mask_stream = mx.new_stream(mx.cpu)
        keep_freed_memory()
        quad = isinstance(optimizer, QUAD)
        spread_parameters = spread_updates and not quad and len(self.streams) > 1  # updates_on_streams
        if quad:  # its parameter groups over the same streams; its fit and momentum native
            optimizer.streams = self.streams if spread_updates else None
            if native_quad:
                quad_fit.install(optimizer)

        def scaled_loss(model, x, y, masks, scale):
            loss, correct = fast.loss_and_correct(fast(x, masks), y)
            return loss * scale, loss, correct

        grad_fn = nn.value_and_grad(model, scaled_loss)

        # Each part of a batch is its own compiled call (traced per part, so per stream): one compiled
        # graph holding both parts would merge their identical constants into one stream's arrays, and
        # the other stream's elementwise kernels would then run unfused and strided.
        @partial(mx.compile, inputs=model.state)
        def gradients(x, y, masks, scale, part):
            params = model.trainable_parameters()
            with mx.stream(self.streams[part]):  # the gradient of this part's share of the batch's mean loss
                (_, loss, correct), grads = grad_fn(model, x, y, masks, scale)
            model.update(params)  # value_and_grad leaves its traced copies in the model
            return loss, correct, grads

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def update(parts):
            loss, correct, grads = parts[0]
            for part_loss, part_correct, _ in parts[1:]:
                loss, correct = loss + part_loss, correct + part_correct
            if not spread_parameters:
                for _, _, part_grads in parts[1:]:
                    grads = tree_map(mx.add, grads, part_grads)
                optimizer.update(model, grads)
                return loss, correct
            params = model.trainable_parameters()
            with updates_on_streams(optimizer, params, self.streams) as stream_of:
                def add(parameter, *halves):  # each parameter's gradient summed where its update runs
                    with mx.stream(stream_of[id(parameter)]):
                        total = halves[0]
                        for half in halves[1:]:
                            total = total + half
                        return total
                optimizer.update(model, tree_map(add, params, *[g for _, _, g in parts]))
            return loss, correct

        def step(x, y, masks):
            n = x.shape[0]
            return update([gradients(x[rows], y[rows], masks and [m[rows] for m in masks], 1 / n, part)
                           for part, rows in enumerate(self.parts(n))])

        @partial(mx.compile, inputs=model.state)
        def evaluate_part(x, y, part):
            with mx.stream(self.streams[part]):
                return fast.loss_and_correct(fast(x), y)

        @partial(mx.compile, inputs=model.state)
        def evaluate_part_after(x, y, rows_prefix, past, part):  # x: the tokens after the prefixes
            with mx.stream(self.streams[part]):
                return fast.loss_and_correct(fast.logits_after(x, past, rows_prefix), y)

        self._fast_step, self._evaluate_part, self._evaluate_part_after = step, evaluate_part, evaluate_part_after
        self._prefix_keys_values = mx.compile(fast.prefix_keys_values, inputs=model.state)

    def running(self):
        return blas_threads(1)  # one BLAS thread per stream

    def parts(self, n: int) -> list:
        """The row slices of the parts of a batch of ``n`` rows: part ``i`` runs on stream ``i``."""
        k = min(len(self.streams), n)
        bounds = [(n * i + k - 1) // k for i in range(k + 1)]  # ceil(n i / k): the first parts are larger
        return [slice(bounds[i], bounds[i + 1]) for i in range(k)]

    def step(self, x, y):
        # The masks are drawn outside the compiled step, so that both halves share the whole batch's masks.
        return self._fast_step(x, y, self._draw_masks(*x.shape)())

    def steps(self, x, y, order: mx.array, batch_size: int, totals=None):
        loss_sum, correct_sum = totals or (mx.array(0.0), mx.array(0))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        masks = self._draw_masks(len(batches[0]), x.shape[1])
        for i, idx in enumerate(batches):
            # The next batch's masks (drawn in the order step() draws them) start now beside this step
            # rather than between two steps.
            upcoming = self._draw_masks(len(batches[i + 1]), x.shape[1]) if i + 1 < len(batches) else None
            loss, correct = self._fast_step(x[idx], y[idx], masks())
            loss_sum, correct_sum = loss_sum + loss, correct_sum + correct
            mx.async_eval(self.state, loss_sum, correct_sum)
            masks = upcoming
        return loss_sum, correct_sum

    def _draw_masks(self, rows: int, length: int):
        """Start drawing the dropout masks of a batch of ``rows`` (by ``native_masks``, else on the mask
        stream); the returned call gives them (None without dropout)."""
        shapes = self.fast.dropout_shapes(rows, length)
        if shapes and self.native_masks is not None:
            return self.native_masks.draw(self.fast.keep_prob, shapes)
        with mx.stream(self.mask_stream):
            masks = self.fast.dropout_masks(rows, length)
        if masks:
            mx.async_eval(masks)
        return lambda: masks

    def evaluation_plan(self, x: np.ndarray):
        """``(P, prefixes, inverse)`` of ``shared_prefixes`` as arrays, or None."""
        plan = shared_prefixes(x)
        # int32 rows: what the native attention reads (no conversion per block and chunk)
        return None if plan is None else (plan[0], mx.array(plan[1]), mx.array(plan[2], mx.int32))

    def evaluator(self, x, y):
        """Each part of the rows (see ``parts``) in chunks of at most ``EVAL_CHUNK`` rows on its own stream;
        prefixes shared by many rows (``a op`` of ``a op b =``) computed once each."""
        plan = self.evaluation_plan(np.asarray(x))

        def evaluate():
            with self.eval_mode():
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
                            totals.append(self._evaluate_part_after(x[chunk, length:], y[chunk], inverse[chunk],
                                                                    past, part))
            return tuple(sum(t[k] for t in totals) for k in range(2))
        return evaluate
