"""OpenBLAS (``fastblas.py``) against the optional MKL (``requirements-mkl.txt``):

    python benchmarks/blas_choice.py [--repeats 3] [--epochs 20] [--set KEY=VALUE ...]

Each measurement is a fresh process (``GROKKING_BLAS=openblas`` or ``mkl``) that trains the default run
(``training.loop.train``, no files) for ``--epochs`` epochs; the kinds alternate ``--repeats`` times after one
unmeasured epoch each. Where the environment sets ``OPENBLAS_CORETYPE`` (which picks OpenBLAS's kernels), a third
kind runs OpenBLAS without it, on the kernels it picks for the CPU itself. It prints the median ms per step and per
evaluation of each, the first kind's over the others', and whether each gave the same metrics in all its runs (the
libraries and kernels differ from each other by float rounding).
"""
import os
import sys

from fresh_runs import compare, parse_args


def kinds() -> dict:
    found = {"openblas": ("", {"GROKKING_BLAS": "openblas"}), "mkl": ("", {"GROKKING_BLAS": "mkl"})}
    if "OPENBLAS_CORETYPE" in os.environ:
        found["openblas, its own kernels"] = ("", {"GROKKING_BLAS": "openblas", "OPENBLAS_CORETYPE": None})
    return found


def main(argv=None) -> int:
    args, overrides = parse_args(__doc__, argv)
    return compare(kinds(), args, overrides)


if __name__ == "__main__":
    sys.exit(main())
