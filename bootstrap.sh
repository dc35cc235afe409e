#!/usr/bin/env bash
# Quick start: `bash bootstrap.sh train [overrides]` or `bash bootstrap.sh test [pytest args]`.
# Creates .venv with Python 3.12 on first use, (re)installs the project when pyproject.toml changed,
# then trains the tiny default model or runs the test suite.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${DSMOE_VENV:-.venv}

find_python312() {
  for candidate in python3.12 "${HOME}"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "Python 3.12 not found: install it (e.g. 'pyenv install 3.12') or put python3.12 on PATH" >&2
  return 1
}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$(find_python312)" -m venv "$VENV"
  fi
  local stamp="$VENV/.dsmoe-install-stamp" want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c 'import dsmoe_megatron, megatron.core' 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  train)
    setup
    gpus=$("$VENV/bin/python" -c 'import torch; print(torch.cuda.device_count())')
    if [ "$gpus" -gt 0 ]; then
      exec "$VENV/bin/torchrun" --standalone --nproc-per-node "$gpus" -m dsmoe_megatron.train yaml_configs/tiny.yaml "$@"
    fi
    exec "$VENV/bin/python" -m dsmoe_megatron.train yaml_configs/tiny.yaml "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash bootstrap.sh train [key=value ...] | test [pytest args]" >&2
    exit 2
    ;;
esac
