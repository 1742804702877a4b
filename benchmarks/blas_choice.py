"""What the optional MKL (``requirements-mkl.txt``) saves against OpenBLAS (``fastblas.py``):

    python benchmarks/blas_choice.py [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

Each measurement is a fresh process (``GROKKING_BLAS=openblas`` or ``mkl``) that trains the default run
(``training.loop.train``, no files) for ``--epochs`` epochs; the two alternate ``--repeats`` times after one
unmeasured epoch each. It prints the median ms per step and per evaluation of each, their ratios, and whether each
library gave the same metrics in all its runs (the two libraries differ from each other by float rounding).
"""
import sys

from fresh_runs import compare, parse_args

KINDS = {"openblas": ("", {"GROKKING_BLAS": "openblas"}), "mkl": ("", {"GROKKING_BLAS": "mkl"})}


def main(argv=None) -> int:
    args, overrides = parse_args(__doc__, argv)
    return compare(KINDS, args, overrides)


if __name__ == "__main__":
    sys.exit(main())
