# studioml-runner: runner-supervisor with the compiled hot path.
# Options come from the environment (QUEUE_ROOT, WORKING_DIR, CACHE_DIR, EXECUTORS, ...).
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY runner ./runner
RUN pip wheel --no-cache-dir --wheel-dir /wheels . \
 && python -c "import zipfile, glob, sys; names = zipfile.ZipFile(glob.glob('/wheels/studioml_runner-*.whl')[0]).namelist(); sys.exit(0 if any(n.endswith('.so') for n in names) else 'compiled extension missing from the wheel')"

FROM python:3.11-slim
RUN useradd --system --create-home --home-dir /var/lib/studioml-runner runner
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && python -c "import runner._fast as f; assert f.IMPLEMENTATION == 'compiled'"
USER runner
WORKDIR /var/lib/studioml-runner
ENV QUEUE_ROOT=/var/lib/studioml-runner/queues \
    WORKING_DIR=/var/lib/studioml-runner/work \
    CACHE_DIR=/var/lib/studioml-runner/cache \
    RUNTIME_DIR=/tmp/studioml-runner
VOLUME ["/var/lib/studioml-runner"]
ENTRYPOINT ["runner-supervisor"]
