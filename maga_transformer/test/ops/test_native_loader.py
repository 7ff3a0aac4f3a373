"""How ops/_compiled.py picks the runtime libraries: a bundled binary that fits, else a build from the
sources, else the torch ops, saying which in one log line. Each case runs in a fresh interpreter
(the choice is made once per process) against fake bundled libraries compiled here with gcc."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from maga_transformer.ops import _compiled

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _fake_library(path: str, abi: int, source_hash: str, probe_status: int = 0) -> None:
    """A shared library exporting what the loader reads first, with the values given."""
    code = textwrap.dedent(f"""
        int maga_abi_version(void) {{ return {abi}; }}
        const char* maga_build_info(void) {{ return "fake"; }}
        const char* maga_source_hash(void) {{ return "{source_hash}"; }}
        int maga_cuda_probe(int device) {{ return {probe_status}; }}
        const char* maga_cuda_error_string(int code) {{ return "no kernel image is available (fake)"; }}
    """)
    src = path + ".c"
    with open(src, "w") as f:
        f.write(code)
    subprocess.run(["gcc", "-shared", "-fPIC", src, "-o", path], check=True)


def _choose(env: dict) -> str:
    """The log of a fresh process that asks for the CPU kernels and says where they came from."""
    script = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
              "from maga_transformer.ops._compiled import cpu_kernels\n"
              "k = cpu_kernels()\n"
              "print('SOURCE', k.source if k else None)\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": _ROOT, **env},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    return done.stdout


@pytest.fixture()
def lib_dir(tmp_path):
    variant = "avx512" if {"avx512f", "avx512_vnni"} <= _compiled._cpu_flags() else "avx2"
    return tmp_path, tmp_path / f"libth_transformer_cpu_{variant}.so"


def test_a_bundled_library_of_another_abi_is_refused_and_the_sources_are_built(lib_dir, tmp_path):
    directory, fake = lib_dir
    _fake_library(str(fake), abi=999, source_hash=_compiled.source_hash())
    log = _choose({"MAGA_NATIVE_LIB_DIR": str(directory), "MAGA_NATIVE_CACHE": str(tmp_path / "cache")})
    assert "ABI version 999, expected" in log and "built from the sources" in log
    assert "SOURCE built" in log
    assert sum("C++ runtime, CPU kernels" in line for line in log.splitlines()) == 1  # one line says which


def test_a_bundled_library_of_other_sources_is_refused(lib_dir):
    directory, fake = lib_dir
    _fake_library(str(fake), abi=_compiled.ABI_VERSION, source_hash="0123456789abcdef")
    log = _choose({"MAGA_NATIVE_LIB_DIR": str(directory), "MAGA_NATIVE_BUILD": "0"})
    assert "built from other sources (0123456789abcdef" in log
    assert "unavailable" in log and "torch ops" in log and "SOURCE None" in log


def test_the_real_bundled_build_is_taken_when_it_fits(tmp_path):
    """The libraries Bazel builds (scripts/build_native.sh) pass every check and are chosen."""
    bundled = [p for p in _compiled._bundled_candidates("cpu") if os.path.exists(p)]
    if not bundled:
        pytest.skip("no bundled CPU library (run scripts/build_native.sh)")
    import ctypes
    if _compiled.library_fits(ctypes.CDLL(bundled[0]), _compiled.source_hash()) is not None:
        pytest.skip("the bundled CPU library predates these sources (run scripts/build_native.sh)")
    log = _choose({"MAGA_NATIVE_BUILD": "0"})
    assert "the bundled binary" in log and "SOURCE bundled" in log


def test_a_cuda_library_whose_kernels_do_not_run_on_the_device_is_refused(tmp_path, monkeypatch):
    """The CUDA library's probe (a launch of a trivial kernel) failing, as for a GPU its machine
    code does not cover or a driver too old for its runtime: refused with the CUDA error's text."""
    fake = tmp_path / "libth_transformer_cuda.so"
    _fake_library(str(fake), abi=_compiled.ABI_VERSION, source_hash=_compiled.source_hash(), probe_status=209)
    monkeypatch.setenv("MAGA_NATIVE_LIB_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    lib, why = _compiled._try_bundled("cuda", _compiled.source_hash())
    assert lib is None and "device 0: no kernel image is available (fake)" in why
    _fake_library(str(fake), abi=_compiled.ABI_VERSION, source_hash=_compiled.source_hash(), probe_status=0)
    # a fresh file name: the loader's dlopen would otherwise hand back the library already loaded
    os.replace(fake, tmp_path / "fresh.so")
    os.makedirs(tmp_path / "ok")
    os.replace(tmp_path / "fresh.so", tmp_path / "ok" / "libth_transformer_cuda.so")
    monkeypatch.setenv("MAGA_NATIVE_LIB_DIR", str(tmp_path / "ok"))
    lib, path = _compiled._try_bundled("cuda", _compiled.source_hash())
    assert lib is not None and path.endswith("libth_transformer_cuda.so")
