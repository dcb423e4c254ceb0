"""Strict JSON for everything the runner writes (SPEC section 6).

Python's ``json`` writes the non-finite floats ``NaN``, ``Infinity`` and ``-Infinity``, which
strict JSON readers refuse.  The runner writes them as the *strings* ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` instead (a diverged loss stays visible; ``null`` would
read as "no value"), through :func:`dumps`, which also refuses to write anything else that
is not JSON.
"""
from __future__ import annotations

import json
import math
from typing import Any

_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def finite(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, scalars) with every non-finite float replaced by its
    name as a string; the input is not changed, unchanged parts are shared."""
    if isinstance(value, float):
        return value if math.isfinite(value) else _NAMES[repr(value)]
    if isinstance(value, dict):
        if not any(isinstance(v, (float, dict, list, tuple)) for v in value.values()):
            return value
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps`` of ``finite(value)`` with ``allow_nan=False`` (``options`` as for
    ``json.dumps``); raises ``ValueError``/``TypeError`` as ``json.dumps`` does."""
    return json.dumps(finite(value), allow_nan=False, **options)
