"""The only importer of the C++ runtime (src/, module th_transformer).

Built on first use from the sources listed in src/sources.txt with torch's extension builder and
cached by torch (~/.cache/torch_extensions; about 30 s once per machine). If the sources are not
there (an installed wheel), or no compiler works, every op keeps its torch path: the compiled
module is an accelerator, never a requirement. MAGA_DISABLE_CPU_KERNELS=1 turns it off.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import List, Optional

logger = logging.getLogger(__name__)

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SOURCES_LIST = os.path.join(_REPO_ROOT, "src", "sources.txt")
_lock = threading.Lock()
_module = None
_tried = False


def _sources() -> Optional[List[str]]:
    if not os.path.exists(_SOURCES_LIST):
        return None
    with open(_SOURCES_LIST) as f:
        names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    # real paths: Bazel runs each test from its own symlinked runfiles tree, and the build cache
    # must see one set of source paths, or every test target would recompile the module
    paths = [os.path.realpath(os.path.join(_REPO_ROOT, name)) for name in names]
    return paths if all(os.path.exists(p) for p in paths) else None


def _include_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.realpath(_SOURCES_LIST)))


def _build():
    sources = _sources()
    if sources is None:
        logger.info("C++ sources not found next to the package; using torch ops only")
        return None
    from torch.utils.cpp_extension import load
    start = time.monotonic()
    module = load(name="th_transformer_cpu", sources=sources, extra_include_paths=[_include_root()],
                  extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    logger.info("C++ runtime ready in %.1f s", time.monotonic() - start)
    return module


def cpu_kernels():
    """The compiled module, or None when it is disabled or cannot be built here."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            if os.environ.get("MAGA_DISABLE_CPU_KERNELS") != "1":
                try:
                    _module = _build()
                except Exception as err:  # no compiler, no ninja, ...: torch ops still work
                    logger.warning("C++ runtime unavailable (%s); using torch ops", err)
            _tried = True
    return _module
