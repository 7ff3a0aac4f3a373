#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite through Bazel, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The embedded model is converted from GGUF once (about 25 s) and cached for every test target after it.
python3 -c "from maga_transformer.model_loader import default_model_dir; print('default model:', default_model_dir())"
# The C++ runtime is compiled once (about 30 s) into torch's extension cache, shared by the targets.
python3 -c "from maga_transformer.ops._compiled import cpu_kernels; print('C++ runtime:', cpu_kernels())"
status=0
[ -x /usr/local/cuda/bin/nvcc ] && { bazel build --config=cuda //src:cuda_kernels || status=$?; }  # CUDA kernels: ~48 s cold on 2 cores
bazel test //maga_transformer/... "$@" || status=$?
# one closing line with pytest's counts over all targets ("N passed, N failed, N skipped")
python3 scripts/test_summary.py "$(bazel info bazel-testlogs 2>/dev/null || echo bazel-testlogs)" || status=1
# do not leave a Bazel server running after CI
bazel shutdown >/dev/null 2>&1 || true
exit $status
