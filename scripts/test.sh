#!/usr/bin/env bash
# Make .venv current (scripts/setup.sh: seconds when it is) and run the test suite.
#   bash scripts/test.sh [PYTEST ARGS...]          every test (15+ minutes)
#   bash scripts/test.sh --quick [PYTEST ARGS...]  the unit tests only (-m "not e2e": no
#       supervisor, broker, cloud emulator or browser; about a minute); tests/conftest.py
#       says which tests are e2e.
# "No tests ran" (pytest exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = "--quick" ]; then
    shift
    select=(-m "not e2e")
fi
bash scripts/setup.sh >/dev/null
status=0
.venv/bin/python -m pytest -q "${select[@]}" "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: no tests ran" >&2
    exit 1
fi
exit "$status"
