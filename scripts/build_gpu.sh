#!/usr/bin/env bash
# Makes the CUDA kernels ready on a GPU machine and says where they came from: the bundled library
# (maga_transformer/lib/, e.g. carried from a build machine's `scripts/build_native.sh --cuda`) when it
# fits, else a build from src/ with the machine's nvcc for its GPUs (cached by source hash).
# Usage: bash scripts/build_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - <<'PY'
import logging
import sys

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from maga_transformer.ops import _compiled  # noqa: E402

kernels = _compiled.cuda_kernels()
if kernels is None:
    sys.exit("build_gpu.sh: no CUDA kernels (see the log line above)")
logging.getLogger("build_gpu").info("CUDA kernels (%s): %s", kernels.source, kernels.path)
PY
