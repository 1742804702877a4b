"""What drawing the dropout masks by native code saves (``training/speed/masks.py``):

    python benchmarks/dropout_masks.py [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

First, in this process, one batch's masks for the default model (batch 512: (512, 4, 512) and (512, 1, 512)),
drawn by ``mx.random.bernoulli`` on a CPU stream and by ``NativeMasks``, alternating (ms, minimum and median of
21 rounds of 10 draws), and whether they are the same bits. Then fresh processes that train the default run
(``training.loop.train``, no files) for ``--epochs`` epochs with MLX's masks or the native ones, alternating
``--repeats`` times: the median ms per step and per evaluation of each, their ratios, and whether the two
kinds gave the same metrics, which they should to the last bit.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastblas  # noqa: E402,F401  (before mlx: loads an optimized BLAS on Linux)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from fresh_runs import compare, parse_args  # noqa: E402
from rounds import alternate_rounds  # noqa: E402
from training.speed.masks import NativeMasks  # noqa: E402

SHAPES = [(512, 4, 512), (512, 1, 512)]
MLX_MASKS = "import training.speed.trainer as speed\nspeed.NativeMasks.build = classmethod(lambda cls: None)"
KINDS = {"MLX's masks": (MLX_MASKS, {}), "native masks": ("", {})}


def time_draws(native: NativeMasks) -> dict:
    """``{kind: (min, median)}`` ms to draw one batch's masks, by MLX on a CPU stream and by ``native``."""
    stream = mx.new_stream(mx.cpu)

    def by_mlx():
        with mx.stream(stream):
            mx.eval([mx.random.bernoulli(0.8, shape) for shape in SHAPES])

    def by_native():
        mx.eval(native.draw(0.8, SHAPES)())
    return alternate_rounds({"mx.random.bernoulli": by_mlx, "NativeMasks": by_native}, calls=10, rounds=21)


def main(argv=None) -> int:
    args, overrides = parse_args(__doc__, argv)
    native = NativeMasks.build()
    if native is None:
        raise SystemExit("error: NativeMasks did not build here (it needs g++ on Linux)")
    mx.random.seed(0)
    expected = [np.array(mx.random.bernoulli(0.8, shape)) for shape in SHAPES]
    mx.random.seed(0)
    same = all(np.array_equal(np.array(a), b) for a, b in zip(native.draw(0.8, SHAPES)(), expected))
    times = time_draws(native)
    print(f"one batch's masks {SHAPES}, p = 0.8 (min / median ms), the same bits: {same}")
    for kind, (low, median) in times.items():
        print(f"  {kind:20s} {low:6.2f} / {median:6.2f} ms")
    print(f"  mx.random.bernoulli / NativeMasks: {times['mx.random.bernoulli'][0] / times['NativeMasks'][0]:.1f}")
    return compare(KINDS, args, overrides, same_across_kinds=True)


if __name__ == "__main__":
    sys.exit(main())
