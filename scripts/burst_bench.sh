#!/usr/bin/env bash
# Issue 20's burst, side by side in one run: N documents of ~WORDS words + N short chats, all at
# once, against conveyor with a fixed 2,048-token budget, conveyor with --target-itl-ms, llama.cpp's
# server and vLLM's CPU build (scripts/bench_peers.sh does the serving); prints a ready-to-paste
# Markdown block (CPU, load, date, command, table).
#
# usage: scripts/burst_bench.sh OUT_DIR
# env:   NUM=16 WORDS=1200 DOC_TOKENS=64 CHAT_TOKENS=128 TARGET_MS=1000
#        GOODPUT="itl:$((TARGET_MS*13/10)) ttft:60000"  THREADS_ENV (OMP_NUM_THREADS for all)
#        PEERS="conveyor conveyor-target llama-bf16-16 vllm-bf16"; plus bench_peers.sh's env
#        (LLAMA_SERVER, VLLM_PY, HF_DIR, CONVEYOR)
set -euo pipefail
OUT=${1:?usage: burst_bench.sh OUT_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
NUM=${NUM:-16}; WORDS=${WORDS:-1200}; TARGET_MS=${TARGET_MS:-1000}
python "$HERE/scripts/burst_workload.py" "$OUT/burst.jsonl" --num "$NUM" --words "$WORDS" \
  --doc-tokens "${DOC_TOKENS:-64}" --chat-tokens "${CHAT_TOKENS:-128}"
export DATASET="$OUT/burst.jsonl"
export PEERS=${PEERS:-conveyor conveyor-target llama-bf16-16 vllm-bf16}
export CONVEYOR_ARGS=${CONVEYOR_ARGS:---num-kv-blocks 1536 --max-model-len 2048}
export TARGET_ARGS=${TARGET_ARGS:---target-itl-ms $TARGET_MS --max-num-partial-prefills 4 --long-prefill-token-threshold 256}
export GOODPUT=${GOODPUT:-itl:$((TARGET_MS * 13 / 10)) ttft:60000}
export LLAMA_CTX=${LLAMA_CTX:-2048}
export PEER_TABLE_ARGS="--baseline conveyor"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u '+%Y-%m-%d %H:%M UTC')
"$HERE/scripts/bench_peers.sh" "$OUT" > "$OUT/bench_peers.out"
{
  echo "Burst (issue 20): $NUM documents of $WORDS words + $NUM short chats, all at once;"
  echo "goodput SLOs \`--goodput $GOODPUT\`; conveyor-target: \`$TARGET_ARGS\`; both conveyors: \`$CONVEYOR_ARGS\`."
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores;"
  echo "load average before / after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg); started $START."
  echo "Command: \`NUM=$NUM WORDS=$WORDS TARGET_MS=$TARGET_MS scripts/burst_bench.sh $OUT\`"
  echo
  sed -n '/^| server/,/^$/p' "$OUT/bench_peers.out"
} | tee "$OUT/table.md"
