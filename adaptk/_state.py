"""JSON-safe encoding of controller state: data only, never code (no pickle).

Supports what learned state is made of: numbers, strings, lists, tuples, dicts (any hashable
scalar keys), sets, numpy arrays and scalars, ``numpy.random.Generator`` and objects exposing
``state_dict()``/``load_state_dict()`` (estimators). The output survives ``json.dumps``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_TAG = "__adaptk__"


def encode(value: Any) -> Any:
    """Return a JSON-safe representation of ``value``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value):
            return value
        return {_TAG: "float", "repr": repr(value)}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"cannot encode array of dtype {value.dtype}")
        return {_TAG: "ndarray", "dtype": value.dtype.str, "shape": list(value.shape),
                "data": [encode(v) for v in value.ravel().tolist()]}
    if isinstance(value, np.random.Generator):
        return {_TAG: "rng", "state": value.bit_generator.state}
    if isinstance(value, tuple):
        return {_TAG: "tuple", "items": [encode(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {_TAG: "set", "items": [encode(v) for v in sorted(value)]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: encode(v) for k, v in value.items()}
        return {_TAG: "dict", "items": [[encode(k), encode(v)] for k, v in value.items()]}
    if hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
        return {_TAG: "object", "state": value.state_dict()}
    raise TypeError(f"cannot encode {type(value).__name__} as controller state")


def decode(value: Any, current: Any = None) -> Any:
    """Inverse of :func:`encode`. ``current`` is the live object an ``object`` entry restores into."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: decode(v) for k, v in value.items()}
    if tag == "float":
        return float(value["repr"])
    if tag == "ndarray":
        return np.asarray([decode(v) for v in value["data"]], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if tag == "rng":
        rng = np.random.default_rng()
        rng.bit_generator.state = value["state"]
        return rng
    if tag == "tuple":
        return tuple(decode(v) for v in value["items"])
    if tag == "set":
        return {decode(v) for v in value["items"]}
    if tag == "dict":
        return {_hashable(decode(k)): decode(v) for k, v in value["items"]}
    if tag == "object":
        if current is None or not hasattr(current, "load_state_dict"):
            raise ValueError("state holds an object entry but the live attribute cannot load state")
        current.load_state_dict(value["state"])
        return current
    raise ValueError(f"unknown state tag {tag!r}")


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key
