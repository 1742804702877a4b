"""What the native attention primitives save (``training/speed/attention.cpp``):

    python benchmarks/native_attention.py [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

Each measurement is a fresh process that trains the default run (``training.loop.train``, no files) for
``--epochs`` epochs with MLX's attention (``mx.fast.scaled_dot_product_attention``, whose fallback on this backend
is ``B x H`` tiny matmuls and a pass per step of the softmax) or with the native one (the speed layer's default
where it builds); the two kinds alternate ``--repeats`` times after one unmeasured epoch each. It prints the
median ms per step and per evaluation of each and their ratios. The two kinds sum the dot products in different
orders, so their metrics differ by float rounding; each kind's runs should agree to the last bit.
"""
import sys

from fresh_runs import compare, parse_args

MLX_ATTENTION = ("import training.speed.trainer as speed\nfast_model = speed.FastModel\n"
                 "speed.FastModel = lambda model, cfg: fast_model(model, cfg, native_attention=False)")
KINDS = {"MLX's attention": (MLX_ATTENTION, {}), "native attention": ("", {})}


def main(argv=None) -> int:
    args, overrides = parse_args(__doc__, argv)
    return compare(KINDS, args, overrides)


if __name__ == "__main__":
    sys.exit(main())
