#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite through Bazel, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The embedded model is converted from GGUF once (about 25 s) and cached for every test target after it.
python3 -c "from maga_transformer.model_loader import default_model_dir; print('default model:', default_model_dir())"
# The runtime libraries (src/, C ABI) built by Bazel into maga_transformer/lib/, where the loader
# finds them as bundled binaries (the wheel carries the same files); the CUDA library where nvcc is
# (about 5 minutes cold on 2 cores: sm_80 + sm_90a + PTX).
status=0
if [ -x /usr/local/cuda/bin/nvcc ]; then bash scripts/build_native.sh --cuda || status=$?; else bash scripts/build_native.sh || status=$?; fi
python3 -c "from maga_transformer.ops._compiled import cpu_kernels; k = cpu_kernels(); print('C++ runtime:', k and (k.source, k.path))"
bazel test //maga_transformer/... "$@" || status=$?
# the release wheel, installed into a fresh virtual environment, runs the embedded model through the
# Pipeline and the server with its bundled CPU kernels (about 80 s)
bash scripts/wheel_smoke.sh || status=$?
# one closing line with pytest's counts over all targets ("N passed, N failed, N skipped")
python3 scripts/test_summary.py "$(bazel info bazel-testlogs 2>/dev/null || echo bazel-testlogs)" || status=1
# do not leave a Bazel server running after CI
bazel shutdown >/dev/null 2>&1 || true
exit $status
