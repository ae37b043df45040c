"""``json_safe``: one way to turn results into JSON for the CLI, the labs and the exports.

JSON has no NaN or infinity (a diverged layer produces both), no tuples and no tensors;
every ``to_dict`` of a result goes through this so they all agree on the mapping.
"""

from __future__ import annotations

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
