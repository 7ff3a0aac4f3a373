#!/usr/bin/env bash
# The README's main command: set up, start the HTTP server on the embedded model (or the model the
# environment names), show one native and one OpenAI call with curl, then keep serving (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
port=${START_PORT:-8088}
export START_PORT=$port FT_SERVER_TEST=${FT_SERVER_TEST:-1} PY_LOG_LEVEL=${PY_LOG_LEVEL:-INFO}
python3 -m maga_transformer.start_server &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "the server did not start" >&2; exit 1; }
  sleep 0.5
done
echo
echo "\$ curl -XPOST http://127.0.0.1:$port -d '{\"prompt\": \"hello, what is your name\", \"generate_config\": {\"max_new_tokens\": 32, \"top_k\": 1}}'"
curl -s -XPOST "http://127.0.0.1:$port" \
  -d '{"prompt": "hello, what is your name", "generate_config": {"max_new_tokens": 32, "top_k": 1}}'
echo; echo
echo "\$ curl http://127.0.0.1:$port/v1/chat/completions -H 'Content-Type: application/json' -d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"temperature\": 0}'"
curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 32}'
echo; echo
echo "serving on http://127.0.0.1:$port (Ctrl-C to stop)"
wait $server
