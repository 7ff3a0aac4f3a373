#!/usr/bin/env bash
# Builds the th_transformer module with its CUDA kernels on a GPU machine (CUDA torch + nvcc +
# ninja; no Bazel), from the same source list as Bazel (src/sources.txt), into torch's extension
# cache, and prints where it landed. Later imports reuse the cached build.
# Usage: bash scripts/build_gpu.sh   (VERBOSE=1 shows the compiler commands)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'PY'
import logging
import os
import sys

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from maga_transformer.ops import _compiled  # noqa: E402

if not _compiled.cuda_build_possible():
    sys.exit("build_gpu.sh: needs CUDA torch, a visible GPU and nvcc (MAGA_DISABLE_CUDA_KERNELS unset)")
module = _compiled.compiled_module(verbose=os.environ.get("VERBOSE") == "1")
if module is None or not getattr(module, "has_cuda", False):
    sys.exit("build_gpu.sh: the CUDA build failed (see the log above)")
logging.getLogger("build_gpu").info("th_transformer with CUDA kernels: %s", module.__file__)
PY
