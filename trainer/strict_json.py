"""JSON as strict parsers read it: every JSON file the project writes goes through ``dumps``.

Python's ``json`` writes a NaN or infinite float as the bare words ``NaN`` and ``Infinity``,
which are not JSON: ``jq``, JavaScript and most other parsers reject the whole file. A run
that diverged has such values (its last loss, a step time over zero), so they are written as
``null``, as pydantic writes them, and ``allow_nan=False`` makes any that slip past an error.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float, however deep in dicts, lists and tuples, as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
