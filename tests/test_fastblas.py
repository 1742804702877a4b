"""Which BLAS ``fastblas`` loads, and the trainer's control of its threads."""
import sys
import sysconfig

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
