"""Controller families, one module each. Importing this package registers them all."""

from adaptk.controllers.analytic import Analytic, AnalyticTable
from adaptk.controllers.bandit import *  # noqa: F401,F403
from adaptk.controllers.budget import SSSDBudget
from adaptk.controllers.cap import Capped
from adaptk.controllers.early_exit import *  # noqa: F401,F403
from adaptk.controllers.fixed import Fixed
from adaptk.controllers.flagship import AdaptK
from adaptk.controllers.goodput import DynamicSD, SmartSpec, SmartSpecPerRequest
from adaptk.controllers.heuristic import HFHeuristic
from adaptk.controllers.kld import *  # noqa: F401,F403
from adaptk.controllers.stopping import *  # noqa: F401,F403

__all__ = [
    "AdaptK", "Analytic", "AnalyticTable", "Capped", "DynamicSD", "Fixed", "HFHeuristic",
    "SSSDBudget", "SmartSpec", "SmartSpecPerRequest",
]
