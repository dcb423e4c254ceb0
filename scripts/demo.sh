#!/usr/bin/env bash
# Set up .venv, start a real runner-supervisor on the embedded default (local queue,
# file:// storage, no server), run examples/hello through it, show where everything went,
# and stop the supervisor.  Everything lives under .runner-demo/ in this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export PATH="$(pwd)/.venv/bin:$PATH"
DEMO="$(pwd)/.runner-demo"
mkdir -p "$DEMO"
export RUNNER_QUEUE_ROOT="$DEMO/queues" RUNNER_WORKING_DIR="$DEMO/work" RUNNER_CACHE_DIR="$DEMO/cache"
export RUNNER_RUNTIME_DIR="/tmp/studioml-runner-demo-$(id -u)"
STORAGE="file://$DEMO/storage"
export RUNNER_FILE_STORE_ROOTS="$DEMO/storage"  # the runner serves file:// only under these

runner-supervisor >"$DEMO/supervisor.log" 2>&1 &
SUPERVISOR=$!
trap 'kill -TERM $SUPERVISOR 2>/dev/null || true; wait $SUPERVISOR 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    runner-ctl --timeout 1 status >/dev/null 2>&1 && break
    kill -0 $SUPERVISOR 2>/dev/null || { cat "$DEMO/supervisor.log"; exit 1; }
    sleep 0.3
done

echo "== submitting examples/hello (3 epochs) and waiting for it"
runner-submit --storage "$STORAGE" --wait --wait-timeout 5m examples/hello train.py 3
echo
echo "== runner-ctl status"
runner-ctl status
echo
echo "== where things went"
echo "queues:           $RUNNER_QUEUE_ROOT"
echo "artifacts:        ${STORAGE#file://}/experiments/"
echo "metadata files:   ${STORAGE#file://}/experiments/<key>/_metadata/"
echo "metadata store:   ${STORAGE#file://}/metadata/"
echo "environments:     $RUNNER_CACHE_DIR/envs"
echo "supervisor log:   $DEMO/supervisor.log"
