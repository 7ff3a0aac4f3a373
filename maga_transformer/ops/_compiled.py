"""The only importer of the C++ runtime (src/, module th_transformer).

Built on first use from the sources listed in src/sources.txt with torch's extension builder and
cached by torch (~/.cache/torch_extensions). One module, two builds:

- CPU torch (CI): the CPU sources only, as "th_transformer_cpu" (about 30 s once per machine);
- CUDA torch with nvcc (the GPU machine): the CPU sources plus the `[cuda]` section, compiled
  for the local GPU's architecture with MAGA_WITH_CUDA defined, as "th_transformer_cuda". A
  failed CUDA build falls back to the CPU build.

If the sources are not there (an installed wheel), or no compiler works, every op keeps its torch
path: the compiled module is an accelerator, never a requirement. MAGA_DISABLE_CPU_KERNELS=1 turns
off the CPU kernels, MAGA_DISABLE_CUDA_KERNELS=1 the CUDA ones (and their build).
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

logger = logging.getLogger(__name__)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SOURCES_LIST = os.path.join(_REPO_ROOT, "src", "sources.txt")
_CUDA_SECTION = "[cuda]"
_lock = threading.Lock()
_module = None
_tried = False


@dataclass
class SourceLists:
    cpu: List[str]  # real paths of the sources every build compiles
    cuda: List[str]  # real paths of the CUDA build's additional sources


def read_source_lists(path: str = _SOURCES_LIST) -> Optional[SourceLists]:
    """The two lists of src/sources.txt as real paths, or None when any source is missing."""
    if not os.path.exists(path):
        return None
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
            # cache must see one set of source paths, or every test target would recompile the module
            current.append(os.path.realpath(os.path.join(_REPO_ROOT, name)))
    return lists if all(os.path.exists(p) for p in lists.cpu + lists.cuda) else None


def _include_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.realpath(_SOURCES_LIST)))


def cuda_build_possible() -> bool:
    """CUDA torch, a visible GPU (its arch picks the -gencode) and nvcc: the CUDA build can run."""
    if os.environ.get("MAGA_DISABLE_CUDA_KERNELS") == "1":
        return False
    import torch
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    return bool(nvcc) and os.path.exists(nvcc)


def _gencode_flags() -> List[str]:
    """-gencode for every visible GPU's architecture (torch adds no arch flags of its own once one is
    given), unless TORCH_CUDA_ARCH_LIST names the architectures: torch then turns it into flags."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    import torch
    archs = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _build(with_cuda: bool, verbose: bool = False):
    lists = read_source_lists()
    if lists is None:
        logger.info("C++ sources not found next to the package; using torch ops only")
        return None
    from torch.utils.cpp_extension import load
    start = time.monotonic()
    cflags = ["-O3", "-march=native", "-fopenmp"]
    if with_cuda:
        module = load(name="th_transformer_cuda", sources=lists.cpu + lists.cuda,
                      extra_include_paths=[_include_root()], extra_cflags=cflags + ["-DMAGA_WITH_CUDA"],
                      extra_cuda_cflags=["-O3"] + _gencode_flags(),
                      extra_ldflags=["-fopenmp"], verbose=verbose)
    else:
        module = load(name="th_transformer_cpu", sources=lists.cpu, extra_include_paths=[_include_root()],
                      extra_cflags=cflags, extra_ldflags=["-fopenmp"], verbose=verbose)
    logger.info("C++ runtime (%s) ready in %.1f s: %s", "CPU + CUDA" if with_cuda else "CPU",
                time.monotonic() - start, getattr(module, "__file__", "?"))
    return module


def _build_best(verbose: bool = False):
    if cuda_build_possible():
        try:
            return _build(with_cuda=True, verbose=verbose)
        except Exception as err:  # keep the CPU kernels and torch's CUDA ops
            logger.warning("CUDA build of the C++ runtime failed (%s); building the CPU kernels only", err)
    return _build(with_cuda=False, verbose=verbose)


def compiled_module(verbose: bool = False):
    """The compiled module (built once per process, cached on disk by torch), or None."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = _build_best(verbose)
            except Exception as err:  # no compiler, no ninja, ...: torch ops still work
                logger.warning("C++ runtime unavailable (%s); using torch ops", err)
            _tried = True
    return _module


def cpu_kernels():
    """The compiled module for its CPU kernels, or None when disabled or it cannot be built here."""
    if os.environ.get("MAGA_DISABLE_CPU_KERNELS") == "1":
        return None
    return compiled_module()


def cuda_kernels():
    """The compiled module when it carries the CUDA kernels and they are enabled, else None.

    Only called for CUDA tensors, so a CPU-only run never builds anything for it.
    """
    if os.environ.get("MAGA_DISABLE_CUDA_KERNELS") == "1":
        return None
    module = compiled_module()
    return module if getattr(module, "has_cuda", False) else None
