"""adaptk: online controllers that choose the speculation length for speculative decoding.

``import adaptk`` stays light: it never imports torch, transformers or vllm.
"""

from adaptk import controllers as _controllers  # noqa: F401  (registers the built-in controllers)
from adaptk.core import SpeculationController, StopRule
from adaptk.registry import available, from_spec, get_class, make, register
from adaptk.types import ControllerError, Decision, Feedback, StepContext

__version__ = "0.1.0"

__all__ = [
    "ControllerError",
    "Decision",
    "Feedback",
    "SpeculationController",
    "StepContext",
    "StopRule",
    "available",
    "from_spec",
    "get_class",
    "make",
    "register",
    "__version__",
]
