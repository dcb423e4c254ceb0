# studioml-runner: runner-supervisor with the compiled hot path.
#
#   docker build -t studioml-runner .
#   docker run -e RUNNER_QUEUE_MATCH='^local_.*$' -e RUNNER_EXECUTORS=2 -p 9090:9090 studioml-runner
#
# Every option of README.md's table is read from the environment (RUNNER_QUEUE_MATCH, RUNNER_EXECUTORS,
# RUNNER_DRAIN_TIMEOUT, RUNNER_PROM_ADDRESS, RUNNER_SLACK_HOOK, ...); flags given after the image name win.
# `docker stop` sends SIGTERM: the runner drains (running experiments get RUNNER_DRAIN_TIMEOUT),
# so give it time: `docker stop -t 900`, or terminationGracePeriodSeconds in Kubernetes.
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md MANIFEST.in ./
COPY packaging ./packaging
COPY runner ./runner
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
 && python -c "import zipfile, glob, sys; names = zipfile.ZipFile(glob.glob('/wheels/studioml_runner-*.whl')[0]).namelist(); sys.exit(0 if any(n.endswith('.so') for n in names) else 'compiled extension missing from the wheel')"

FROM python:3.11-slim
# tini reaps orphans of experiments (they reparent to PID 1) and forwards signals.
# bubblewrap, skopeo and umoci: the python-mode sandbox and OCI images (docs/containers.md);
# inside a container they need user namespaces (e.g. a seccomp profile that allows them),
# without which --sandbox auto runs unsandboxed and says so at start.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini bubblewrap skopeo umoci \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --create-home --home-dir /var/lib/studioml-runner runner
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && python -c "import runner._fast as f; assert f.IMPLEMENTATION == 'compiled'" \
 && python -m runner.systemd unit > /dev/null
USER runner
WORKDIR /var/lib/studioml-runner
ENV RUNNER_QUEUE_ROOT=/var/lib/studioml-runner/queues \
    RUNNER_WORKING_DIR=/var/lib/studioml-runner/work \
    RUNNER_CACHE_DIR=/var/lib/studioml-runner/cache \
    RUNNER_FILE_STORE_ROOTS=/var/lib/studioml-runner/storage \
    RUNNER_RUNTIME_DIR=/tmp/studioml-runner \
    RUNNER_PROM_ADDRESS=0.0.0.0:9090 \
    RUNNER_DRAIN_TIMEOUT=10m \
    RUNNER_LOG_FORMAT=json \
    RUNNER_LOG_LEVEL=info
VOLUME ["/var/lib/studioml-runner"]
EXPOSE 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; port = os.environ.get('RUNNER_PROM_ADDRESS', ':9090').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"
ENTRYPOINT ["/usr/bin/tini", "--", "runner-supervisor"]
