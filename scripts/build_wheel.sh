#!/usr/bin/env bash
# Builds the release wheel into dist/: the runtime libraries first (Bazel; the CUDA one wherever
# /usr/local/cuda/bin/nvcc exists, unless --cpu-only), then `pip wheel` with them and src/ inside.
#   bash scripts/build_wheel.sh [--cpu-only]
set -euo pipefail
cd "$(dirname "$0")/.."
cuda_lib=maga_transformer/lib/libth_transformer_cuda.so
if [ "${1:-}" != "--cpu-only" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  bash scripts/build_native.sh --cuda
else
  bash scripts/build_native.sh
  if [ -f "$cuda_lib" ]; then  # an older CUDA library must not ship: set it aside while packing
    aside=$(mktemp /tmp/maga_cuda_lib.XXXXXX)
    mv "$cuda_lib" "$aside"
    trap 'mv "$aside" "$cuda_lib"' EXIT
  fi
fi
rm -rf build dist
python3 -m pip wheel --no-deps --no-build-isolation -q -w dist .
ls -la dist/*.whl
