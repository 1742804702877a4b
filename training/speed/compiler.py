"""MLX's fused CPU kernels built for the machine they run on.

MLX JIT-compiles each fused elementwise kernel by running ``g++ -std=c++17 -O3 -Wall -fPIC -shared`` from
``PATH`` (the Linux wheel adds no ``-march``), so the kernels use baseline x86-64 SSE2: no AVX2, no
AVX-512, and every ``fmaf`` in MLX's ``exp`` is a libm call. ``build_kernels_for_this_cpu`` puts a ``g++``
first on this process's ``PATH`` that adds flags for this CPU, and points MLX's kernel cache (it keeps one
shared library per kernel under ``$TMPDIR/mlx/<version>/cpu`` and reuses any it finds) at a directory of
its own, named after the compiler, the flags and the CPU, so kernels built one way are never loaded for
the other. ``-ffp-contract=off`` keeps ``a * b + c`` two roundings, as in the baseline build, so the
kernels compute the same floats, only faster. ``build_library`` builds the layer's own C++ (``masks.cpp``)
with the same compiler and flags.
"""
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

FLAGS = ("-march=native", "-ffp-contract=off")


def cpu_signature() -> str:
    """The CPU's model name and feature flags (Linux), which decide what ``-march=native`` builds."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def real_compiler() -> Optional[str]:
    """The ``g++`` on ``PATH`` other than the wrapper (a process started from one that called
    ``build_kernels_for_this_cpu`` has the wrapper first on its PATH), or None."""
    search = [d for d in os.environ.get("PATH", "").split(os.pathsep)
              if not Path(d).parent.name.startswith("mlx-kernels-")]
    return shutil.which("g++", path=os.pathsep.join(search))


def build_kernels_for_this_cpu(flags: tuple = FLAGS) -> bool:
    """Have MLX build the fused CPU kernels this process compiles from now on with ``flags`` added (Linux on
    x86-64 with a ``g++`` on ``PATH`` that accepts them); returns whether it did. Kernels already loaded stay as
    they were."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    compiler = real_compiler()
    if compiler is None:
        return False
    key = hashlib.sha256("\n".join([os.path.realpath(compiler), *flags, cpu_signature()]).encode()).hexdigest()
    name, tmp = f"mlx-kernels-{key[:16]}", Path(tempfile.gettempdir())
    root = tmp if tmp.name == name else tmp / name  # a child process inherits this process's TMPDIR
    wrapper = root / "bin" / "g++"
    if os.environ["PATH"].split(os.pathsep)[0] == str(wrapper.parent):
        return True
    if not wrapper.exists():
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        quoted = " ".join(f"'{f}'" for f in flags)
        staged = wrapper.with_name(f"g++.{os.getpid()}")
        staged.write_text(f'#!/bin/sh\nexec \'{compiler}\' "$@" {quoted}\n')
        staged.chmod(0o755)
        # A compiler that refuses the flags, or a temporary directory mounted noexec: keep MLX's own build.
        probe = [str(staged), "-std=c++17", "-O3", "-fPIC", "-shared", "-x", "c++", "-", "-o", os.devnull]
        try:
            works = subprocess.run(probe, input="", capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            works = False
        if not works:
            staged.unlink()
            return False
        os.replace(staged, wrapper)  # whole or absent, also with several processes starting at once
    os.environ["PATH"] = os.pathsep.join([str(wrapper.parent), os.environ["PATH"]])
    # Ray names its session's sockets under $TMPDIR (or $RAY_TMPDIR), and an AF_UNIX path has at most 107 bytes: the
    # kernel cache's directory would take a Ray instance started from this process (or a child) past that.
    os.environ.setdefault("RAY_TMPDIR", str(root.parent))
    os.environ["TMPDIR"] = str(root)  # MLX's kernel cache: $TMPDIR/mlx/<version>/cpu, read at each build
    return True


def build_library(source: Path, flags: tuple = FLAGS, options: tuple = (), identity: tuple = ()) -> Optional[Path]:
    """The C++ file ``source`` built with ``flags`` (and ``options``: more sources, include paths, libraries) into a
    shared library in the temporary directory, named after the compiler, the flags, this CPU, the source, the
    options and ``identity`` (versions of what the options point at), so that it is built once and rebuilt only
    when one of them changes; None on Linux without a ``g++`` that builds it, and elsewhere."""
    compiler = real_compiler()
    if platform.system() != "Linux" or compiler is None:
        return None
    key = hashlib.sha256("\n".join([os.path.realpath(compiler), *flags, cpu_signature(), source.read_text(),
                                    *options, *identity]).encode()).hexdigest()
    library = Path(tempfile.gettempdir()) / f"{source.stem}-{key[:16]}.so"
    if library.exists():
        return library
    staged = library.with_name(f"{library.name}.{os.getpid()}")
    command = [compiler, "-std=c++17", "-O3", "-fPIC", "-shared", *flags, str(source), *options, "-o", str(staged)]
    try:
        built = subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        built = False
    if not built:
        staged.unlink(missing_ok=True)
        return None
    os.replace(staged, library)  # whole or absent, also with several processes building at once
    return library
