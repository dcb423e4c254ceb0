"""Build script for the Cython hot path (runner/_fast).

The extensions are mandatory: a missing Cython or C compiler fails the build loudly instead of
shipping the package without them (DESIGN convention 8). Metadata lives in pyproject.toml.
"""
import os
import platform
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - exercised only on a broken build host
    sys.stderr.write(
        "\nERROR: studioml-runner needs Cython>=3.0 to build its compiled hot path "
        "(runner/_fast/*.pyx); install Cython and a C compiler and retry.\n\n"
    )
    raise SystemExit(f"Cython is required: {exc}") from exc

import Cython  # noqa: E402

if int(Cython.__version__.split(".")[0]) < 3:
    raise SystemExit(f"Cython>=3.0 is required to build runner/_fast, found {Cython.__version__}")


class StrictBuildExt(build_ext):
    """build_ext that refuses to skip any extension and names the failure.

    ``_jsonlines`` also compiles simdjson's single-file source from the installed pysimdjson;
    it is added here, at build time, because setup() arguments may not hold absolute paths.
    """

    def build_extension(self, ext):
        if ext.name == "runner._fast._jsonlines":
            source, folder = simdjson_sources()
            if source not in ext.sources:
                ext.sources.append(source)
                ext.include_dirs.append(folder)
        try:
            super().build_extension(ext)
        except Exception as exc:
            sys.stderr.write(
                f"\nERROR: building the compiled extension {ext.name} failed ({exc}).\n"
                "Working C and C++ compilers and Python headers are required; the package is never built "
                "without its extensions.\n\n"
            )
            raise


PACKAGING = ("studioml-runner.service", "runner.env", "studioml-runner.sysusers.conf")


class BuildPyWithPackaging(build_py):
    """build_py that also installs packaging/ (systemd unit, options file, sysusers) as
    package data under runner/_packaging/, where runner.systemd.packaged_file finds it."""

    def run(self):
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(self.build_lib, "runner", "_packaging")
        os.makedirs(target, exist_ok=True)
        for name in PACKAGING:
            source = os.path.join(here, "packaging", name)
            if not os.path.isfile(source):
                raise SystemExit(f"packaging/{name} is missing; it is installed with the package")
            shutil.copyfile(source, os.path.join(target, name))


DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "embedsignature": True,
}

# The vendored xxHash (runner/_fast/vendor/xxhash) is linked into _hashing; on x86 its
# dispatcher picks SSE2/AVX2/AVX-512 at run time, so the build needs no -march flags.
XXHASH = "runner/_fast/vendor/xxhash"
XXHASH_SOURCES = [f"{XXHASH}/xxhash.c"]
if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
    XXHASH_SOURCES.append(f"{XXHASH}/xxh_x86dispatch.c")
# Headers are listed as ``depends``: a changed header rebuilds its extension
# (``setup.py build_ext --inplace``, as scripts/setup.sh runs it).

def simdjson_sources() -> tuple[str, str]:
    """simdjson's single-file source and its directory, as the pysimdjson wheel ships them
    (a build requirement: pyproject.toml)."""
    try:
        import simdjson
    except ImportError as exc:  # pragma: no cover - a broken build environment
        raise SystemExit(f"pysimdjson is required to build runner/_fast/_jsonlines: {exc}") from exc
    folder = os.path.dirname(simdjson.__file__)
    source = os.path.join(folder, "simdjson.cpp")
    if not os.path.isfile(source) or not os.path.isfile(os.path.join(folder, "simdjson.h")):
        raise SystemExit(f"pysimdjson at {folder} ships no simdjson.cpp/simdjson.h")
    return source, folder


extensions = [
    Extension("runner._fast._base62", ["runner/_fast/_base62.pyx"], optional=False),
    Extension("runner._fast._masking", ["runner/_fast/_masking.pyx"], optional=False),
    Extension("runner._fast._hashing", ["runner/_fast/_hashing.pyx", "runner/_fast/filehash.c",
                                          *XXHASH_SOURCES],
              include_dirs=["runner/_fast"], optional=False,
              depends=["runner/_fast/filehash.h", "runner/_fast/xxh3_file.h",
                       f"{XXHASH}/xxhash.h", f"{XXHASH}/xxh_x86dispatch.h"]),
    # C++: the newest-first merge walks simdjson's DOM (runner/_fast/sjmerge.h); simdjson's
    # source is added by StrictBuildExt.
    Extension("runner._fast._jsonlines", ["runner/_fast/_jsonlines.pyx"],
              include_dirs=["runner/_fast"], language="c++",
              extra_compile_args=["-std=c++17"], optional=False,
              depends=["runner/_fast/sjmerge.h"]),
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, quiet=True),
    cmdclass={"build_ext": StrictBuildExt, "build_py": BuildPyWithPackaging},
)
