#!/usr/bin/env bash
# Set up .venv and run the whole test suite.  Extra arguments go to pytest.
# "No tests ran" (pytest exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: no tests ran" >&2
    exit 1
fi
exit "$status"
