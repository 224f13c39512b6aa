#!/usr/bin/env bash
# Fuzz the HTTP API from its own /openapi.json with schemathesis, against a fresh `conveyor serve`
# on a free loopback port with small limits. Fails (exit 1) on any 5xx, on a KV block still held
# once the server is idle, or on /health not 200 afterwards.
#   scripts/fuzz_api.sh [MAX_EXAMPLES]     examples per operation (default 30)
#   env: PYTHON (default .venv/bin/python), FUZZ_SEED (default 0), FUZZ_LOG_DIR (keep logs there),
#        FUZZ_MODEL (a model path for --model; default conveyor's default model)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MAX_EXAMPLES=${1:-30}
SEED=${FUZZ_SEED:-0}
LOG_DIR=${FUZZ_LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
KEY="fuzz-$$-$RANDOM"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"
MODEL_ARGS=()
[ -n "${FUZZ_MODEL:-}" ] && MODEL_ARGS=(--model "$FUZZ_MODEL")

# Small limits: short contexts and outputs keep each fuzzed generation short; a request timeout
# bounds whatever the fuzzer asks for.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PY" -m conveyor.cli serve --host 127.0.0.1 --port "$PORT" \
  "${MODEL_ARGS[@]}" --api-key "$KEY" --dtype float32 --max-model-len 256 --num-kv-blocks 64 --max-num-seqs 4 \
  --max-n 2 --max-waiting-requests 16 --max-body-bytes 65536 --request-timeout 30 \
  --log-level warning >"$LOG_DIR/server.log" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" || true
  fi
}
trap stop_server EXIT

"$PY" - "$URL" "$SERVER_PID" <<'EOF'
import os, sys, time, httpx
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("fuzz_api: the server exited before it was healthy (see server.log)")
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit("fuzz_api: the server was not healthy after 300 s")
EOF

status=0
"$(dirname "$PY")/schemathesis" run "$URL/openapi.json" --checks not_a_server_error \
  --max-examples "$MAX_EXAMPLES" --seed "$SEED" --workers 2 --request-timeout 60 \
  --phases examples,coverage,fuzzing --suppress-health-check all \
  -H "Authorization: Bearer $KEY" \
  --include-path /v1/completions --include-path /v1/chat/completions \
  --include-path /tokenize --include-path /detokenize --include-path /v1/models \
  --report junit,ndjson --report-dir "$LOG_DIR" >"$LOG_DIR/schemathesis.log" 2>&1 || status=$?
tail -n 25 "$LOG_DIR/schemathesis.log"
[ "$status" -eq 0 ] || echo "fuzz_api: schemathesis failed (exit $status); full log: $LOG_DIR/schemathesis.log"

# Once the server is idle every KV block must be free again and /health must say ok.
"$PY" - "$URL" "$KEY" <<'EOF' || status=1
import sys, time, httpx
url, key = sys.argv[1], sys.argv[2]

def gauges():
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=10).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("conveyor:"):
            values[name.removeprefix("conveyor:")] = float(value)
    return values

deadline = time.monotonic() + 60
g = gauges()
while g["num_requests_running"] + g["num_requests_waiting"] > 0 and time.monotonic() < deadline:
    time.sleep(0.5)
    g = gauges()
free, total = int(g["kv_cache_free_blocks"]), int(g["kv_cache_total_blocks"])
health = httpx.get(url + "/health", timeout=10)
print(f"fuzz_api: KV blocks free {free}/{total}; running {g['num_requests_running']:.0f}, "
      f"waiting {g['num_requests_waiting']:.0f}; /health {health.status_code} {health.text}")
ok = free == total and health.status_code == 200
sys.exit(0 if ok else "fuzz_api: the pool is not whole or the server is unhealthy")
EOF
if grep -q "Traceback" "$LOG_DIR/server.log"; then
  echo "fuzz_api: the server logged tracebacks:"; grep -B2 -A20 "Traceback" "$LOG_DIR/server.log" | head -80
  status=1
fi
[ "$status" -eq 0 ] && echo "fuzz_api: passed (logs in $LOG_DIR)" || echo "fuzz_api: FAILED (logs in $LOG_DIR)"
exit "$status"
