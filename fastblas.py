"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel bundles the Netlib reference BLAS, whose matmul runs ~40x slower than
OpenBLAS on the grokking shapes (6 vs 230 GFLOP/s measured here, see README). Loading an
optimized BLAS into the global symbol scope before ``mlx.core`` is first imported makes MLX's
``sgemm``/``dgemm`` calls resolve to it. Every entry module imports this one first.
macOS is never touched: MLX uses Accelerate there.
"""
import ctypes
import os
import site
import sys
import sysconfig
from pathlib import Path

# Debian's libopenblas0-pthread installs the first; the others cover common distributions.
OPENBLAS = ("libopenblas.so.0", "libopenblasp-r0.3.so", "libopenblas.so")
CANDIDATES = (*OPENBLAS, "libmkl_rt.so.2", "libblis.so.4")
INSTALL_HINT = "apt-get install libopenblas0-pthread"
MKL_WHEEL_LIBRARY = "libmkl_rt.so.3"  # where pip puts the `mkl` wheel's libraries: <install prefix>/lib


def pip_mkl() -> list:
    """Paths of MKL as installed by ``pip install -r requirements-mkl.txt``, if any: on an Intel CPU the optional
    MKL is taken before any system BLAS (it was asked for, and measured faster there, see README)."""
    prefixes = [sysconfig.get_paths()["data"], sys.prefix, site.getuserbase()]
    found = [Path(prefix) / "lib" / MKL_WHEEL_LIBRARY for prefix in prefixes]
    return list(dict.fromkeys(str(path) for path in found if path.exists()))


def intel_cpu(cpuinfo: str) -> bool:
    """Whether the text of ``/proc/cpuinfo`` is an Intel CPU's (its first ``vendor_id``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id":
            return value.strip() == "GenuineIntel"
    return False


def cpuinfo() -> str:
    """The text of ``/proc/cpuinfo``, or "" where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def load_fast_blas(choice: str | None = None) -> str | None:
    """Load the first optimized BLAS found into the global scope; return its name or None. ``choice``
    (``GROKKING_BLAS``): ``openblas`` or ``mkl`` for the first of that kind, else a library's name or path.
    Without a choice, a pip-installed MKL comes first on an Intel CPU, and after OpenBLAS on others: on this
    project's AMD EPYC it ran the default run's steps slower than OpenBLAS, 1.11x against its AVX2 kernels and 1.39x
    against the AVX-512 ones it picks there itself (README)."""
    mkl = pip_mkl()
    kinds = {"openblas": OPENBLAS, "mkl": (*mkl, "libmkl_rt.so.2")}
    if choice is not None:
        names = kinds.get(choice, (choice,))
    else:
        names = (*mkl, *CANDIDATES) if intel_cpu(cpuinfo()) else (*OPENBLAS, *mkl, *CANDIDATES[len(OPENBLAS):])
    for name in names:
        if "mkl_rt" in name:
            # One BLAS thread per CPU stream is how the trainer calls it; MKL's sequential layer runs that as
            # fast as its OpenMP layers (README) and needs no OpenMP runtime. MKL_THREADING_LAYER picks another.
            os.environ.setdefault("MKL_THREADING_LAYER", "SEQUENTIAL")
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if hasattr(lib, "cblas_sgemm"):  # a library that is no BLAS (a foreign GROKKING_BLAS) is passed over
            return name
    return None


def threads() -> tuple:
    """``(get, set)``: the loaded BLAS's functions for its number of threads, or None where it has none."""
    lib = ctypes.CDLL(LOADED) if LOADED else None
    for get, put in (("openblas_get_num_threads", "openblas_set_num_threads"),
                     ("MKL_Get_Max_Threads", "MKL_Set_Num_Threads")):
        if lib is not None and hasattr(lib, get) and hasattr(lib, put):
            return getattr(lib, get), getattr(lib, put)
    return None


def describe() -> str | None:
    """The loaded BLAS as the benchmarks' headers and ``summary.json`` name it: its name and, for OpenBLAS, its version
    and the kernels it runs (``OPENBLAS_CORETYPE``, where set, chooses them); None without one."""
    lib = ctypes.CDLL(LOADED) if LOADED else None
    if lib is None or not hasattr(lib, "openblas_get_corename"):
        return LOADED
    lib.openblas_get_corename.restype = lib.openblas_get_config.restype = ctypes.c_char_p
    version = lib.openblas_get_config().decode().split()[1]
    core = os.environ.get("OPENBLAS_CORETYPE")
    chosen = f", as OPENBLAS_CORETYPE={core} asks" if core is not None else ""
    return f"{LOADED} (OpenBLAS {version}, {lib.openblas_get_corename().decode()} kernels{chosen})"


LOADED = None
if sys.platform.startswith("linux") and os.environ.get("GROKKING_NO_FAST_BLAS") != "1":
    if "mlx.core" in sys.modules:
        print("warning: mlx.core was imported before fastblas; the optimized BLAS may not be used. "
              "Import main/models/data before mlx.", file=sys.stderr)
    CHOICE = os.environ.get("GROKKING_BLAS") or None
    LOADED = load_fast_blas(CHOICE)
    if LOADED is None and CHOICE is not None:
        raise SystemExit(f"error: GROKKING_BLAS={CHOICE!r} could not be loaded; give openblas, mkl (installed by "
                         "requirements-mkl.txt) or a BLAS library's name or path")
    if LOADED is None:
        print(f"warning: no optimized BLAS found; MLX matmuls will run ~40x slower. Fast path: {INSTALL_HINT}",
              file=sys.stderr)
