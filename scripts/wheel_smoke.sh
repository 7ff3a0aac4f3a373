#!/usr/bin/env bash
# The release wheel outside the source tree: builds it both ways (scripts/build_wheel.sh's pip path
# and Bazel's //maga_transformer:maga_transformer_whl, CPU libraries) and checks they hold the same
# files, installs Bazel's into a fresh virtual environment (system site-packages for torch and the
# other requirements, but not this tree), and from another directory runs the embedded model through
# the Pipeline and the server with the wheel's bundled CPU kernels, asserting that they, not a
# build, were loaded.
#   bash scripts/wheel_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build_wheel.sh --cpu-only
bazel build //maga_transformer:maga_transformer_whl
wheel="$(bazel info bazel-bin)/maga_transformer/maga_transformer-0.1.0-py3-none-linux_x86_64.whl"
python3 - "$wheel" dist/maga_transformer-*.whl <<'PY'
import sys
import zipfile

bazel, pip = (sorted(zipfile.ZipFile(path).namelist()) for path in sys.argv[1:3])
assert bazel == pip, f"the two wheels differ: {sorted(set(bazel) ^ set(pip))[:10]}"
assert any(name.endswith("lib/libth_transformer_cpu_avx2.so") for name in bazel), "no CPU library in the wheel"
print(f"wheel smoke: Bazel's and pip's wheels hold the same {len(bazel)} files")
PY
venv=$(mktemp -d /tmp/maga_wheel_venv.XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv --system-site-packages "$venv"
"$venv/bin/pip" install -q --no-deps --no-index "$wheel"
cd "$venv"
# a machine without compilers must not be needed: MAGA_NATIVE_BUILD=0 forbids the build from sources
MAGA_NATIVE_BUILD=0 PYTHONPATH= "$venv/bin/python" - <<'PY'
import logging
import os

logging.basicConfig(level=logging.INFO, format="%(message)s")
import maga_transformer
from maga_transformer.ops._compiled import cpu_kernels

package = os.path.dirname(maga_transformer.__file__)
assert package.startswith(os.environ.get("VIRTUAL_ENV", "") or os.getcwd()), package
kernels = cpu_kernels()
assert kernels is not None and kernels.source == "bundled", kernels
assert kernels.path.startswith(package), (kernels.path, package)
print("wheel smoke: bundled CPU kernels", kernels.path)

from maga_transformer.model_factory import ModelFactory
from maga_transformer.pipeline import Pipeline
model = ModelFactory.from_huggingface(None)
pipeline = Pipeline(model, model.tokenizer)
text = pipeline.generate(["The capital of France is"], max_new_tokens=8, top_k=1).batch_response[0]
pipeline.stop()
assert text.strip(), "the Pipeline generated nothing"
print("wheel smoke: Pipeline:", repr(text))
PY
# the server, started from the installed package on a free port, answers a native request
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
MAGA_NATIVE_BUILD=0 PYTHONPATH= START_PORT=$port FT_SERVER_TEST=1 PY_LOG_LEVEL=INFO "$venv/bin/python" -m maga_transformer.start_server > server.log 2>&1 &
server=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null 2>&1 && break
  kill -0 $server 2> /dev/null || { cat server.log; echo "wheel smoke: the server did not start" >&2; exit 1; }
  sleep 0.5
done
reply=$(curl -sf -XPOST "http://127.0.0.1:$port" -d '{"prompt": "hello", "generate_config": {"max_new_tokens": 8, "top_k": 1}}')
kill -TERM $server; wait $server || true
grep -q "CPU kernels: the bundled binary" server.log || { cat server.log; echo "wheel smoke: the server did not load the bundled kernels" >&2; exit 1; }
echo "wheel smoke: server: $reply"
echo "wheel smoke: passed"
