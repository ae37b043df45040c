"""json_safe: the one JSON mapping every result's to_dict uses."""

import json
import math

import numpy as np
import torch

from bnviz.serialize import json_safe


def test_json_safe_maps_non_json_values():
    obj = {1: (float("nan"), math.inf, 2.5), "t": torch.tensor([1.0, float("-inf")]),
           "a": np.array([[1, 2]]), "n": None, "s": "x", "b": True}
    out = json_safe(obj)
    assert out == {"1": [None, None, 2.5], "t": [1.0, None], "a": [[1, 2]], "n": None,
                   "s": "x", "b": True}
    json.dumps(out, allow_nan=False)  # strict JSON
