#!/usr/bin/env bash
# Run the benchmark suites and print the table of figures (README's "make bench").
#   bash scripts/bench.sh            full sizes (200 MB scrape, 1 GiB hash, 200 experiments, 60 s idle)
#   bash scripts/bench.sh --quick    smaller sizes, under three minutes on a 2-core VM (no peers)
#   bash scripts/bench.sh --peers    only the peer suite: the runner beside the StudioML 0.0.49
#                                    reference worker and a bare Celery worker (~7 min; with
#                                    --quick ~3 min; BENCH_PROFILE=1 adds the role profile)
# Extra arguments go to pytest.  Figures: .bench/results.json (BENCH_RESULTS to move it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
SUITES="benchmarks/test_bench_fast.py benchmarks/test_bench_scrape.py benchmarks/test_bench_bus.py
    benchmarks/test_bench_env.py benchmarks/test_bench_e2e.py benchmarks/test_bench_results.py
    benchmarks/test_bench_launcher.py benchmarks/test_bench_startup.py benchmarks/test_bench_submit.py"
PEERS=benchmarks/test_bench_peers.py
peers_only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) export BENCH_QUICK=1 ;;
        --peers) peers_only=1 ;;
        *) break ;;
    esac
    shift
done
if [ -n "$peers_only" ]; then
    SUITES=$PEERS
elif [ -z "${BENCH_QUICK:-}" ]; then
    SUITES="$SUITES $PEERS"
fi
export BENCH_RESULTS=${BENCH_RESULTS:-$PWD/.bench/results.json}
mkdir -p "$(dirname "$BENCH_RESULTS")"
rm -f "$BENCH_RESULTS"
"$PY" setup.py build_ext --inplace -q >/dev/null
status=0
# shellcheck disable=SC2086 # the suites are words
"$PY" -m pytest -q -p no:cacheprovider --benchmark-columns=min,median,rounds $SUITES "$@" \
    || status=$?
echo
echo "Figures (${BENCH_QUICK:+quick mode, }$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)):"
"$PY" -m benchmarks.table
exit "$status"
