#!/usr/bin/env bash
# One entry point for a fresh clone: creates (or reuses) .venv, installs routelab with torch pinned to the CPU
# build 2.13.0, then runs a command in it.
#   ./dev.sh compare [ARGS]   the main job: train the same small MoE LM once per router, report side by side
#   ./dev.sh demo [ARGS]      train one MoE layer on random data and print its routing statistics
#   ./dev.sh test [ARGS]      the test suite (pytest)
#   ./dev.sh routelab ARGS    any routelab command
#   ./dev.sh python ARGS      the environment's python (benchmarks: ./dev.sh python benchmarks/layer.py)
set -euo pipefail
cd "$(dirname "$0")"

venv="${ROUTELAB_VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -c 'import sys; assert sys.version_info >= (3, 11), "routelab needs Python >= 3.11"'
  "$python" -m venv "$venv"
fi
# Reinstall only when the dependencies changed. torch is pinned first: an unpinned torch would pull a CUDA build.
stamp="$venv/.routelab-install"
want="$(cat pyproject.toml dev.sh | cksum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[all]"
  echo "$want" > "$stamp"
fi

command="${1:-}"
shift || true
case "$command" in
  compare) exec "$venv/bin/routelab" compare "$@" ;;
  demo) exec "$venv/bin/routelab" demo "$@" ;;
  test) exec "$venv/bin/python" -m pytest "$@" ;;
  routelab) exec "$venv/bin/routelab" "$@" ;;
  python) exec "$venv/bin/python" "$@" ;;
  *) echo "usage: ./dev.sh {compare|demo|test|routelab|python} [ARGS]" >&2; exit 2 ;;
esac
