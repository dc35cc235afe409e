#!/usr/bin/env bash
# Quick start:
#   bash bootstrap.sh train [key=value ...]   train yaml_configs/tiny.yaml on this machine (CPU or all GPUs)
#   bash bootstrap.sh test [pytest args]      the test suite (what CI runs)
#   bash bootstrap.sh lock [pytest args]      re-resolve to the newest versions pyproject.toml allows,
#                                             run the suite on them and, if it passes, rewrite requirements/
# train and test create .venv with Python 3.12 on first use and install the project with exactly the
# versions of requirements/lock.txt, again whenever pyproject.toml or the lock changes.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${DSMOE_VENV:-.venv}
LOCK=requirements/lock.txt

find_python312() {
  for candidate in python3.12 "${HOME}"/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "Python 3.12 not found: install it (e.g. 'pyenv install 3.12') or put python3.12 on PATH" >&2
  return 1
}

# A fresh venv holds 6 GB (torch with its CUDA libraries) and the install peaks at 7 GB with pip's
# downloads in TMPDIR: a full disk would stop pip half-way with a bare "No space left on device".
FRESH_INSTALL_GB=8

need_free_space() {
  local dir=$1 free_gb
  while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
  free_gb=$(df -Pk "$dir" | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$free_gb" -lt "$FRESH_INSTALL_GB" ]; then
    echo "bootstrap.sh: a fresh install needs about $FRESH_INSTALL_GB GB free for the virtualenv and pip's downloads, and $dir has only $free_gb GB free. Free some space, or point DSMOE_VENV (the virtualenv) and TMPDIR (pip's downloads) at a larger disk, then run this command again." >&2
    exit 1
  fi
}

# install VENV [pip install options]: the project with its dev extras into VENV (created if missing).
install() {
  local venv=$1; shift
  if [ ! -x "$venv/bin/python" ]; then
    need_free_space "$(dirname "$venv")"
    need_free_space "${TMPDIR:-/tmp}"
    "$(find_python312)" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$@" -e ".[dev]"
}

setup() {
  local stamp="$VENV/.dsmoe-install-stamp" want
  want=$(cat pyproject.toml "$LOCK" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c 'import dsmoe_megatron, megatron.core' 2>/dev/null; then
    install "$VENV" -c "$LOCK"
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  train)
    setup
    exec "$VENV/bin/python" -m dsmoe_megatron.quickstart "$@"
    ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  lock)
    venv=.venv-lock
    rm -rf "$venv"
    install "$venv"
    out=$(mktemp -d)
    "$venv/bin/python" tools/lock.py "$out"
    DSMOE_REQUIREMENTS="$out" "$venv/bin/python" -m pytest -q "$@"
    cp "$out"/lock.txt "$out"/transformers-oldest.txt requirements/
    echo "requirements/ now pins the versions this suite passed with; review and commit it (git diff requirements/)"
    ;;
  *)
    echo "usage: bash bootstrap.sh train [key=value ...] | test [pytest args] | lock [pytest args]" >&2
    exit 2
    ;;
esac
