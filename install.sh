#!/usr/bin/env bash
# Creates .venv in the project root and installs multieye-dist with its dev extra.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian ships venv/ensurepip separately.
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$PY" -m venv .venv
    else
      echo "install.sh: '$PY -m venv' failed; install python3-venv and rerun" >&2
      exit 1
    fi
  fi
fi

pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install "setuptools>=64" wheel
# torch first: DeepSpeed's setup.py imports torch, so it is built without isolation against it.
pip install -c constraints.txt torch torchvision
DS_BUILD_OPS=0 pip install -c constraints.txt --no-build-isolation -e '.[dev]'
echo "install.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
