"""Controller families, one module each. Importing this package registers them all."""

from adaptk.controllers.fixed import Fixed
from adaptk.controllers.flagship import AdaptK
from adaptk.controllers.heuristic import HFHeuristic

__all__ = ["AdaptK", "Fixed", "HFHeuristic"]
