"""Which BLAS ``fastblas`` loads, and the trainer's control of its threads."""
import os
import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastblas
from training.speed.trainer import blas_threads


def test_mkl_from_pip_is_found_under_each_install_prefix_once(tmp_path, monkeypatch):
    venv, user = tmp_path / "venv", tmp_path / "user"
    for prefix in (venv, user):
        (prefix / "lib").mkdir(parents=True)
        (prefix / "lib" / fastblas.MKL_WHEEL_LIBRARY).write_bytes(b"")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"data": str(venv)})
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(fastblas.site, "getuserbase", lambda: str(user))
    assert fastblas.pip_mkl() == [str(venv / "lib" / fastblas.MKL_WHEEL_LIBRARY),
                                  str(user / "lib" / fastblas.MKL_WHEEL_LIBRARY)]
    monkeypatch.setattr(fastblas.site, "getuserbase", lambda: str(tmp_path / "elsewhere"))
    (venv / "lib" / fastblas.MKL_WHEEL_LIBRARY).unlink()
    assert fastblas.pip_mkl() == []


@pytest.mark.skipif(fastblas.threads() is None, reason="the loaded BLAS (if any) has no thread control")
def test_blas_threads_sets_the_loaded_blas_and_restores_it():
    get, put = fastblas.threads()
    before = get()
    put(2)
    outside = get()  # 2, or 1 for a sequential build (MKL's sequential layer)
    with blas_threads(1):
        assert get() == 1
    assert get() == outside
    put(before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fastblas loads a BLAS on Linux only")
def test_an_unloadable_blas_choice_is_a_one_line_error():
    done = subprocess.run([sys.executable, "-c", "import fastblas"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent,
                          env={**os.environ, "GROKKING_BLAS": "libnothing.so.9"})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: GROKKING_BLAS='libnothing.so.9' could not be loaded; give openblas, mkl (installed by "
        "requirements-mkl.txt) or a BLAS library's name or path"]


def test_a_blas_choice_by_kind_tries_only_that_kind(monkeypatch):
    tried = []

    def cdll(name, mode=0):
        tried.append(name)
        raise OSError(name)
    monkeypatch.setattr(fastblas.ctypes, "CDLL", cdll)
    monkeypatch.setattr(fastblas, "pip_mkl", lambda: ["/prefix/lib/libmkl_rt.so.3"])
    monkeypatch.delenv("MKL_THREADING_LAYER", raising=False)
    assert fastblas.load_fast_blas("openblas") is None and tried == list(fastblas.OPENBLAS)
    assert "MKL_THREADING_LAYER" not in os.environ
    tried.clear()
    assert fastblas.load_fast_blas("mkl") is None and tried == ["/prefix/lib/libmkl_rt.so.3", "libmkl_rt.so.2"]
    assert os.environ["MKL_THREADING_LAYER"] == "SEQUENTIAL"
    monkeypatch.setattr(fastblas, "cpuinfo", lambda: INTEL)
    tried.clear()
    assert fastblas.load_fast_blas() is None and tried == ["/prefix/lib/libmkl_rt.so.3", *fastblas.CANDIDATES]
    monkeypatch.setattr(fastblas, "cpuinfo", lambda: AMD)
    tried.clear()
    assert fastblas.load_fast_blas() is None and tried == [*fastblas.OPENBLAS, "/prefix/lib/libmkl_rt.so.3",
                                                           "libmkl_rt.so.2", "libblis.so.4"]


INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\n"
AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n"


def test_only_an_intel_cpu_counts_as_intel():
    assert fastblas.intel_cpu(INTEL)
    assert not fastblas.intel_cpu(AMD)
    assert not fastblas.intel_cpu("")  # no /proc/cpuinfo, or another platform's
    assert not fastblas.intel_cpu("processor\t: 0\nCPU implementer\t: 0x41\n")  # aarch64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fastblas loads a BLAS on Linux only")
def test_a_library_that_is_no_blas_is_not_taken_for_one():
    done = subprocess.run([sys.executable, "-c", "import fastblas"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "GROKKING_BLAS": "libc.so.6"})
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "error: GROKKING_BLAS='libc.so.6' could not be loaded; give openblas, mkl (installed by "
        "requirements-mkl.txt) or a BLAS library's name or path"]


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="OpenBLAS's x86-64 kernel sets")
def test_describe_names_openblas_kernels_and_who_chose_them():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"} | {"GROKKING_BLAS": "openblas"}

    def describe(**extra):
        code = "import fastblas; print(fastblas.describe())"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent, env=env | extra)
    chosen = describe(OPENBLAS_CORETYPE="Prescott")  # SSE3 kernels: any x86-64 CPU runs them
    if chosen.returncode != 0:
        pytest.skip("no OpenBLAS installed")
    assert "(OpenBLAS 0." in chosen.stdout
    assert chosen.stdout.strip().endswith(" Prescott kernels, as OPENBLAS_CORETYPE=Prescott asks)")
    own = describe().stdout.strip()
    assert own.endswith(" kernels)") and "asks" not in own
