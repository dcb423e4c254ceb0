#!/usr/bin/env bash
# Make .venv current and print its path.
#
# * .venv is created when missing.
# * studioml-runner is (re)installed in editable mode with its test and dev extras only when
#   the files that name its dependencies (setup.py, pyproject.toml's install tables,
#   requirements*.txt), the interpreter or the checkout's path changed since the last install:
#   their digest is kept in .venv/.studioml-runner-installed.  The install compiles the Cython
#   hot path.
# * Otherwise the hot path (runner/_fast) is recompiled in place only when one of its
#   sources (.pyx, .pxd, .h, .c) changed since the last build, or a module is missing.
#
# On a current .venv this takes well under a second.  Every install and compile is announced
# on stderr ("setup: ..."); FORCE=1 reinstalls anyway.  Concurrent calls wait for each other.
# The package's bytecode is compiled too (see the end).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.studioml-runner-installed  # digest of what the install depended on
BUILT=$VENV/.studioml-runner-compiled    # touched after each build of the hot path
FAST=runner/_fast

say() { echo "setup: $*" >&2; }

mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

# What the install depends on: the interpreter, the checkout's path, setup.py, requirements*.txt
# and the tables of pyproject.toml that the install reads (build-system, project,
# tool.setuptools; linters' settings are left out). Without tomllib (Python < 3.11): all of it.
dependency_digest() {
    "$VENV/bin/python" - <<'PY'
import glob, hashlib, json, os, sys
digest = hashlib.sha256(f"{sys.version}\n{os.getcwd()}\n".encode())
for name in ["setup.py", *sorted(glob.glob("requirements*.txt"))]:
    with open(name, "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
with open("pyproject.toml", "rb") as f:
    text = f.read()
try:
    import tomllib
except ImportError:
    digest.update(text)
else:
    data = tomllib.loads(text.decode())
    used = {"build-system": data.get("build-system"), "project": data.get("project"),
            "setuptools": data.get("tool", {}).get("setuptools")}
    digest.update(json.dumps(used, sort_keys=True).encode())
print(digest.hexdigest())
PY
}

# Prints why the compiled modules must be built again, or nothing when they are current:
# a module is missing, or a source of runner/_fast (not the .c/.cpp Cython writes) changed
# since the last build (the time of $BUILT).
stale_hot_path() {
    local suffix pyx newer
    suffix=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    for pyx in "$FAST"/_*.pyx; do
        if [ ! -f "${pyx%.pyx}$suffix" ]; then
            echo "${pyx%.pyx}$suffix is not built"
            return
        fi
    done
    if [ ! -f "$BUILT" ]; then
        echo "no build recorded in $BUILT"
        return
    fi
    newer=$(find "$FAST" \( -name '*.pyx' -o -name '*.pxd' -o -name '*.h' -o -name '*.c' \) \
                 ! -name '_*.c' -newer "$BUILT" -print -quit)
    if [ -n "$newer" ]; then
        echo "$newer changed since the last build"
    fi
}

digest=$(dependency_digest)
if [ "${FORCE:-0}" = 1 ] || [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$digest" ]; then
    if [ -f "$STAMP" ]; then reason="dependencies changed"; else reason="not installed yet"; fi
    [ "${FORCE:-0}" = 1 ] && reason="FORCE=1"
    say "installing studioml-runner[test,dev] into $VENV ($reason); this compiles $FAST (a minute or two)"
    rm -f "$STAMP"
    touch "$BUILT.next"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet -e '.[test,dev]' >&2
else
    why=$(stale_hot_path)
    if [ -n "$why" ]; then
        say "compiling $FAST ($why)"
        touch "$BUILT.next"
        "$VENV/bin/python" setup.py --quiet build_ext --inplace >&2
    fi
fi

# The compiled modules import (whatever RUNNER_PUREPYTHON says about using them).
"$VENV/bin/python" -c 'import runner._fast as f; assert f.implementations()["compiled"], f"the compiled hot path did not build: {f.compiled_import_error()}"' >&2
# The build's start time stands for it: a source saved during the build counts as changed.
if [ -f "$BUILT.next" ]; then mv "$BUILT.next" "$BUILT"; fi
[ -f "$STAMP" ] || echo "$digest" >"$STAMP"
# An editable install compiles no bytecode, and with PYTHONDONTWRITEBYTECODE set none is ever
# written: every process of the runner (supervisor, five roles) would compile the package from
# source at each start (~0.4 s of CPU in all).  Compile it here, as a wheel install does
# (quick when current: only changed modules are compiled).
"$VENV/bin/python" -m compileall -q runner >&2
echo "$(pwd)/$VENV"
