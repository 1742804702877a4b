"""What building MLX's fused CPU kernels for this CPU saves (``training/speed/compiler.py``):

    python benchmarks/kernel_build.py [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

Each measurement is a fresh process that trains the default run (``training.loop.train``, no files) for
``--epochs`` epochs with the kernels built as MLX builds them (baseline x86-64) or for this CPU (the speed
layer's default); the two kinds alternate ``--repeats`` times. Each kind's kernels come from its own cache,
filled by an unmeasured one-epoch run first (a first build costs g++ a second or so per kernel). It prints
the median ms per step and per evaluation of each kind, their ratios, and whether the two kinds gave the
same metrics, which they should to the last bit (``-ffp-contract=off``).
"""
import sys

from fresh_runs import compare, parse_args

BASELINE = "import training.speed.trainer as speed\nspeed.build_kernels_for_this_cpu = lambda: False"
KINDS = {"baseline kernels": (BASELINE, {}), "kernels for this CPU": ("", {})}


def main(argv=None) -> int:
    args, overrides = parse_args(__doc__, argv)
    return compare(KINDS, args, overrides, same_across_kinds=True)


if __name__ == "__main__":
    sys.exit(main())
