"""The only loader of the C++ runtime (src/: the C ABI of src/bindings/c_api.h, loaded by ctypes).

Two libraries, each found in this order, and the start-up log says which in one line:
1. the bundled binary in maga_transformer/lib/ (or MAGA_NATIVE_LIB_DIR; a wheel carries it;
   `scripts/build_native.sh` puts a Bazel build there in a source tree), used when it fits: the ABI version this code expects, the
   same sources (a hash of src/, when the sources are present), and for the CPU library a build
   the processor can run (AVX-512 or AVX2), for the CUDA one a device its machine code runs on and a
   driver new enough for its runtime (maga_cuda_probe);
2. a build from the sources (src/, bundled in the wheel too) with the machine's compilers: g++ for
   the CPU kernels (-march=native), nvcc for the CUDA ones (the local GPUs' architectures), cached
   under ~/.cache/maga_transformer/native (MAGA_NATIVE_CACHE) by source hash;
3. nothing: every op runs its torch path (the runtime is an accelerator, never a requirement).

The libraries depend on neither torch nor Python, so one build serves CI's torch 2.13 + Python 3.11
and the GPU machine's torch 2.11 + Python 3.12 alike. MAGA_DISABLE_CPU_KERNELS=1 /
MAGA_DISABLE_CUDA_KERNELS=1 turn a library off; MAGA_NATIVE_BUILD=0 forbids step 2 (a bundled
binary or nothing), MAGA_NATIVE_BUNDLED=0 skips step 1.
"""
from __future__ import annotations

import ctypes
import functools
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from maga_transformer.ops._native import ABI_VERSION, CpuKernels, CudaKernels, library_info

logger = logging.getLogger(__name__)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)
BUNDLED_DIR = os.path.join(_PACKAGE_DIR, "lib")  # MAGA_NATIVE_LIB_DIR names another


def _source_root() -> str:
    """Where src/ is: the repository root in a source tree, the package's _runtime_src in a wheel."""
    bundled = os.path.join(_PACKAGE_DIR, "_runtime_src")
    return bundled if os.path.exists(os.path.join(bundled, "src", "sources.txt")) else _REPO_ROOT


_SOURCES_LIST = os.path.join(_source_root(), "src", "sources.txt")
_CUDA_SECTION = "[cuda]"
_CPU_VARIANT_FLAGS = {  # bundled CPU builds, best first: the -march they were built with, the flags it needs
    "avx512": ("x86-64-v4 -mavx512vnni", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
    "avx2": ("x86-64-v3", {"avx2", "fma", "f16c", "bmi2"}),
}
_lock = threading.Lock()
_loaded: Dict[str, object] = {}


@dataclass
class SourceLists:
    cpu: List[str]  # real paths of the CPU library's sources
    cuda: List[str]  # real paths of the CUDA library's sources


def read_source_lists(path: str = _SOURCES_LIST) -> Optional[SourceLists]:
    """The two lists of src/sources.txt as real paths, or None when any source is missing."""
    if not os.path.exists(path):
        return None
    root = os.path.dirname(os.path.dirname(os.path.realpath(path)))
    lists = SourceLists([], [])
    current = lists.cpu
    with open(path) as f:
        for line in f:
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            if name == _CUDA_SECTION:
                current = lists.cuda
                continue
            # real paths: Bazel runs each test from its own symlinked runfiles tree, and the build
            # cache must see one set of source paths, or every test target would rebuild the library
            current.append(os.path.realpath(os.path.join(root, name)))
    return lists if all(os.path.exists(p) for p in lists.cpu + lists.cuda) else None


def _include_root(path: str = _SOURCES_LIST) -> str:
    return os.path.dirname(os.path.dirname(os.path.realpath(path)))


def source_hash(path: str = _SOURCES_LIST) -> Optional[str]:
    """sha256 over the runtime's sources and headers (relative path and bytes), or None without them.
    src/hash_sources.py computes the same for the Bazel build, which embeds it in the library."""
    root = _include_root(path)
    files = []
    for sub in ("src/bindings", "src/kernels"):
        for directory, _, names in os.walk(os.path.join(root, sub)):
            files += [os.path.join(directory, n) for n in names if n.endswith((".h", ".cuh", ".cc", ".cu"))]
    if not files:
        return None
    digest = hashlib.sha256()
    for full in sorted(files, key=lambda p: os.path.relpath(p, root)):
        digest.update(os.path.relpath(full, root).replace(os.sep, "/").encode() + b"\0")
        with open(full, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


# ---- fitting a library ------------------------------------------------------------------------------

def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _open(path: str) -> Optional[ctypes.CDLL]:
    try:
        return ctypes.CDLL(path)
    except OSError as err:
        logger.debug("cannot load %s: %s", path, err)
        return None


def library_fits(lib: ctypes.CDLL, expected_hash: Optional[str]) -> Optional[str]:
    """None when the library is the one this code was written for, else why not."""
    version, info = library_info(lib)
    if version != ABI_VERSION:
        return f"ABI version {version}, expected {ABI_VERSION}"
    built_from = getattr(lib, "maga_source_hash", None)
    if expected_hash and built_from is not None:
        built_from.restype = ctypes.c_char_p
        theirs = (built_from() or b"").decode()
        if theirs and theirs != expected_hash:
            return f"built from other sources ({theirs}, these are {expected_hash})"
    return None


def _cuda_probe(lib: ctypes.CDLL) -> Optional[str]:
    import torch
    probe = getattr(lib, "maga_cuda_probe", None)
    if probe is None:
        return "no CUDA probe"
    probe.restype, probe.argtypes = ctypes.c_int, [ctypes.c_int]
    for device in range(torch.cuda.device_count()):
        status = probe(device)
        if status:
            errors = getattr(lib, "maga_cuda_error_string")
            errors.restype, errors.argtypes = ctypes.c_char_p, [ctypes.c_int]
            return f"device {device}: {errors(status).decode()}"
    return None


# ---- building from sources ----------------------------------------------------------------------------

def _cache_root() -> str:
    return os.environ.get("MAGA_NATIVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "maga_transformer",
                                                               "native")


def _nvcc() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    return nvcc if nvcc and os.path.exists(nvcc) else None


def _local_cuda_archs() -> List[str]:
    import torch
    return sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


def gencode_flags(archs: List[str]) -> List[str]:
    """Machine code for each architecture, plus PTX of the newest (drivers JIT it for later GPUs);
    sm_90 builds as sm_90a, whose Hopper-only instructions (wgmma, TMA) kernels may use (as
    src/cuda.bzl's Bazel build does)."""
    real = [f"{arch}a" if arch == "90" else arch for arch in archs]
    flags = [f"-gencode=arch=compute_{r},code=sm_{r}" for r in real]
    return flags + [f"-gencode=arch=compute_{real[-1]},code=compute_{real[-1]}"]


def _run(command: List[str]) -> None:
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}):\n{done.stdout[-4000:]}")


def _compile_all(commands: List[List[str]]) -> None:
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for future in [pool.submit(_run, c) for c in commands]:
            future.result()


def _build_cpu(out_dir: str, sources: List[str], defines: List[str]) -> str:
    include = _include_root()
    objects, commands = [], []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        commands.append(["g++", "-std=c++17", "-O3", "-march=native", "-fopenmp", "-fPIC", "-c", f"-I{include}",
                         *defines, src, "-o", obj])
        objects.append(obj)
    _compile_all(commands)
    lib = os.path.join(out_dir, "libth_transformer_cpu.so")
    _run(["g++", "-shared", "-fopenmp", *objects, "-o", lib])
    return lib


def _build_cuda(out_dir: str, sources: List[str], defines: List[str]) -> str:
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("no nvcc")
    include, archs = _include_root(), _local_cuda_archs()
    objects, commands = [], []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        commands.append([nvcc, "-c", "-std=c++17", "-O3", "-Xcompiler", "-fPIC", f"-I{include}", *defines,
                         f"-DMAGA_CUDA_ARCHS=sm_{'+'.join(archs)}", *gencode_flags(archs), src, "-o", obj])
        objects.append(obj)
    _compile_all(commands)
    lib = os.path.join(out_dir, "libth_transformer_cuda.so")
    _run([nvcc, "-shared", "-Xcompiler", "-fPIC", *objects, "-o", lib])
    return lib


def _build_from_sources(kind: str, sources: List[str], digest: str, suffix: str) -> str:
    """The library built once per source hash (and CUDA architecture) under the cache; concurrent
    processes (parallel test targets) wait for one build instead of each running their own."""
    out_dir = os.path.join(_cache_root(), f"{kind}-{digest}{suffix}")
    lib = os.path.join(out_dir, f"libth_transformer_{kind}.so")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(lib):
            staging = os.path.join(out_dir, "staging")
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
            builder = _build_cuda if kind == "cuda" else _build_cpu
            built = builder(staging, sources, [f'-DMAGA_SOURCE_HASH="{digest}"'])
            os.replace(built, lib)  # atomic: a half-written library is never loaded
            shutil.rmtree(staging, ignore_errors=True)
    return lib


# ---- choosing ------------------------------------------------------------------------------------------

def _bundled_candidates(kind: str) -> List[str]:
    directory = os.environ.get("MAGA_NATIVE_LIB_DIR") or BUNDLED_DIR
    if kind == "cuda":
        return [os.path.join(directory, "libth_transformer_cuda.so")]
    flags = _cpu_flags()
    return [os.path.join(directory, f"libth_transformer_cpu_{variant}.so")
            for variant, (_, needed) in _CPU_VARIANT_FLAGS.items() if needed <= flags]


def _try_bundled(kind: str, digest: Optional[str]) -> tuple:
    """(library, path) of the first bundled binary that fits, or (None, why none did)."""
    reasons = []
    for path in _bundled_candidates(kind):
        if not os.path.exists(path):
            continue
        lib = _open(path)
        why = "cannot be loaded" if lib is None else library_fits(lib, digest)
        if why is None and kind == "cuda":
            why = _cuda_probe(lib)
        if why is None:
            return lib, path
        reasons.append(f"{os.path.basename(path)}: {why}")
    return None, "; ".join(reasons) or "none bundled"


def _load(kind: str, wrapper: Callable, sources: Callable[[SourceLists], List[str]], suffix: str = ""):
    digest = source_hash()
    lib, found = (None, "skipped") if os.environ.get("MAGA_NATIVE_BUNDLED") == "0" else _try_bundled(kind, digest)
    if lib is not None:
        kernels = wrapper(lib, found, "bundled")
        logger.info("C++ runtime, %s kernels: the bundled binary (%s: %s)", kind.upper(), found, library_info(lib)[1])
        return kernels
    lists = read_source_lists()
    if lists is None or digest is None or os.environ.get("MAGA_NATIVE_BUILD") == "0":
        why = "no sources" if lists is None else "building is off (MAGA_NATIVE_BUILD=0)"
        logger.info("C++ runtime, %s kernels: unavailable (bundled: %s; %s): torch ops", kind.upper(), found, why)
        return None
    start = time.monotonic()
    try:
        path = _build_from_sources(kind, sources(lists), digest, suffix)
    except Exception as err:  # no compiler, a broken source...: the torch ops still work
        logger.warning("C++ runtime, %s kernels: unavailable (bundled: %s; the build failed: %s): torch ops",
                       kind.upper(), found, err)
        return None
    lib = _open(path)
    why = "cannot be loaded" if lib is None else library_fits(lib, digest) or (
        _cuda_probe(lib) if kind == "cuda" else None)
    if why is not None:
        logger.warning("C++ runtime, %s kernels: the build from sources does not run here (%s): torch ops",
                       kind.upper(), why)
        return None
    logger.info("C++ runtime, %s kernels: built from the sources (bundled: %s) in %.1f s: %s", kind.upper(), found,
                time.monotonic() - start, path)
    return wrapper(lib, path, "built")


def _once(kind: str, loader: Callable[[], object]):
    if kind in _loaded:
        return _loaded[kind]
    with _lock:
        if kind not in _loaded:
            try:
                _loaded[kind] = loader()
            except Exception as err:  # never let the accelerator break the torch path
                logger.warning("C++ runtime, %s kernels: unavailable (%s): torch ops", kind.upper(), err)
                _loaded[kind] = None
    return _loaded[kind]


def cuda_build_possible() -> bool:
    """CUDA torch, a visible GPU and nvcc: a CUDA build from the sources can run here."""
    if os.environ.get("MAGA_DISABLE_CUDA_KERNELS") == "1":
        return False
    import torch
    return torch.version.cuda is not None and torch.cuda.is_available() and _nvcc() is not None


def cpu_kernels() -> Optional[CpuKernels]:
    """The CPU kernels, or None when disabled or unavailable here."""
    if os.environ.get("MAGA_DISABLE_CPU_KERNELS") == "1":
        return None
    return _once("cpu", lambda: _load("cpu", CpuKernels, lambda lists: lists.cpu))


def cuda_kernels() -> Optional[CudaKernels]:
    """The CUDA kernels, or None when disabled, without a CUDA GPU, or unavailable.

    Only called for CUDA tensors, so a CPU-only run never builds anything for it.
    """
    if os.environ.get("MAGA_DISABLE_CUDA_KERNELS") == "1":
        return None
    if not _cuda_present():
        return None
    return _once("cuda", _load_cuda)


@functools.lru_cache(maxsize=None)
def _cuda_present() -> bool:
    """A CUDA torch and a visible GPU: fixed for the life of the process, and asked once, because
    every op on a CUDA tensor calls cuda_kernels() and torch.cuda.is_available() costs ~5 us (a
    1,024-token prefill of an 8B model calls it ~300 times, 1.5-2.5 ms of host time per step)."""
    import torch
    return torch.version.cuda is not None and torch.cuda.is_available()


def _load_cuda() -> Optional[CudaKernels]:
    kernels = _load("cuda", CudaKernels, lambda lists: lists.cuda, "-sm" + "+".join(_local_cuda_archs()))
    if kernels is not None and os.environ.get("MAGA_DECODE_KERNEL") == "stream":
        logger.warning("MAGA_DECODE_KERNEL=stream: an experimental decode kernel that failed the decode tests on "
                       "the H200 (2026-12-04, head_dim 128 at long contexts): do not use it for serving")
    return kernels
