#!/usr/bin/env bash
# Create .venv (if missing) and install studioml-runner into it in editable mode, which
# compiles the Cython hot path in place.  Idempotent; prints the venv's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >&2
.venv/bin/python -m pip install --quiet -e '.[test]' >&2
.venv/bin/python -c 'import runner._fast as f; assert f.IMPLEMENTATION == "compiled", "the compiled hot path did not build"' >&2
echo "$(pwd)/.venv"
