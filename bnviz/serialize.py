"""``json_safe`` and ``to_json``: one way to turn results into JSON for the CLI, the labs and
the exports.

JSON has no NaN or infinity (a diverged layer, or a model whose weights hold NaN, produces
both), no tuples and no tensors; every ``to_dict`` of a result goes through this so they
all agree on the mapping, and every JSON text is written by :func:`to_json`, so a NaN
becomes ``null`` instead of an exception that leaves an export empty.
"""

from __future__ import annotations

import json
import math
from typing import Any


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, tensors/numpy arrays -> lists,
    dict keys -> strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return json_safe(obj.tolist())
    return obj


def to_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` after :func:`json_safe` (NaN and infinity as ``null``).

    Anything else JSON cannot hold still raises ``TypeError``: an export never silently
    drops a value it does not know."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)
