#!/usr/bin/env bash
# Builds the release wheel (scripts/build_wheel.sh: with the CUDA library where nvcc is) and the two
# images from it, with docker or podman, whichever is installed:
#   bash docker/build.sh [cpu|cuda|all]      (default all)
# Then: docker run -p 8088:8088 maga_transformer:cpu
#       docker run --gpus all -p 8088:8088 maga_transformer:cuda
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
engine=$(command -v docker || command -v podman || true)
[ -n "$engine" ] || { echo "docker/build.sh: neither docker nor podman is installed" >&2; exit 1; }
if [ "$which" = cpu ]; then bash scripts/build_wheel.sh --cpu-only; else bash scripts/build_wheel.sh; fi
if [ "$which" != cuda ]; then "$engine" build -f docker/Dockerfile.cpu -t maga_transformer:cpu .; fi
if [ "$which" != cpu ]; then
  unzip -l dist/maga_transformer-*.whl | grep -q libth_transformer_cuda.so \
    || { echo "docker/build.sh: the wheel has no CUDA library (no nvcc here?)" >&2; exit 1; }
  "$engine" build -f docker/Dockerfile.cuda -t maga_transformer:cuda .
fi
