"""What the fused rotary embedding saves (``kernels.rope`` on reordered query / key features):

    python benchmarks/fused_rope.py [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

Each measurement is a fresh process that trains the default run (``training.loop.train``, no files) for
``--epochs`` epochs with MLX's RoPE (``mx.fast.rope``, whose fallback on this backend slices the interleaved
pairs and concatenates them) or with the fused one (the speed layer's default); the two kinds alternate
``--repeats`` times after one unmeasured epoch each. It prints the median ms per step and per evaluation of each
and their ratios. The two kinds sum the query-key dot products in different orders, so their metrics differ by
float rounding; each kind's runs should agree to the last bit.
"""
import sys

from fresh_runs import compare, parse_args

MLX_ROPE = ("import training.speed.trainer as speed\nfast_model = speed.FastModel\n"
            "speed.FastModel = lambda model, cfg: fast_model(model, cfg, fused_rope=False)")
KINDS = {"MLX's RoPE": (MLX_ROPE, {}), "fused RoPE": ("", {})}


def main(argv=None) -> int:
    args, overrides = parse_args(__doc__, argv)
    return compare(KINDS, args, overrides)


if __name__ == "__main__":
    sys.exit(main())
