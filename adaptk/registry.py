"""Build any controller from a name and parameters: ``adaptk.make("smartspec", k_max=8)``.

The registry is also how the CLI and engine processes (vLLM) construct controllers from a spec,
so a spec is data only: a name plus JSON parameters, never something evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from adaptk.core import SpeculationController

__all__ = ["register", "make", "available", "get_class", "from_spec"]

_REGISTRY: dict[str, type[SpeculationController]] = {}
C = TypeVar("C", bound=type[SpeculationController])


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make ``cls`` constructible as ``adaptk.make(name, ...)``."""

    def decorator(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, SpeculationController)):
            raise TypeError(f"{cls!r} is not a SpeculationController subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"controller name {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    """Registered controller names, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type[SpeculationController]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown controller {name!r}; available: {', '.join(available())}") from None


def make(name: str, **params: Any) -> SpeculationController:
    """Construct the controller registered as ``name`` with ``params``."""
    cls = get_class(name)
    unknown = set(params) - set(cls._param_names())
    if unknown:
        raise ValueError(
            f"controller {name!r} has no parameter(s) {sorted(unknown)}; its parameters are {cls._param_names()}"
        )
    return cls(**params)


def from_spec(spec: str | dict[str, Any] | SpeculationController) -> SpeculationController:
    """Build a controller from ``"name"``, ``'{"name": ..., "params": {...}}'`` or such a dict."""
    if isinstance(spec, SpeculationController):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if not text.startswith("{"):
            return make(text)
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"controller spec is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError('controller spec must be a name or {"name": str, "params": {...}}')
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ValueError("controller spec 'params' must be a JSON object")
    return make(spec["name"], **params)
