#!/usr/bin/env bash
# Builds the runtime libraries with Bazel and copies them into maga_transformer/lib/, where the loader
# (maga_transformer/ops/_compiled.py) finds them as the bundled binaries and the wheel picks them up.
#   bash scripts/build_native.sh          the CPU libraries (AVX2, AVX-512)
#   bash scripts/build_native.sh --cuda   also the CUDA library (nvcc at /usr/local/cuda; sm_80, sm_90a)
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(//src:cpu_libraries)
flags=()
if [ "${1:-}" = "--cuda" ]; then
  targets+=(//src:libth_transformer_cuda.so)
  flags+=(--config=cuda)
fi
bazel build "${flags[@]}" "${targets[@]}"
mkdir -p maga_transformer/lib
bin="$(bazel info bazel-bin)/src"
for lib in libth_transformer_cpu_avx2.so libth_transformer_cpu_avx512.so libth_transformer_cuda.so; do
  if [ -f "$bin/$lib" ] && { [ "$lib" != libth_transformer_cuda.so ] || [ "${1:-}" = "--cuda" ]; }; then
    install -m 0755 "$bin/$lib" "maga_transformer/lib/$lib"
    echo "maga_transformer/lib/$lib"
  fi
done
