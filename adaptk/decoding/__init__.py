"""Torch-based decoding: real model loading, drafters and the reference decoder.

Nothing here is imported by ``import adaptk``; users import these modules explicitly, which keeps
torch and transformers optional extras.
"""

from adaptk.decoding.drafters import Drafter, DraftModelDrafter, EarlyExitDrafter, PromptLookupDrafter
from adaptk.decoding.reference import GenerationResult, RequestResult, SpeculativeDecoder, StepRecord

__all__ = [
    "DraftModelDrafter",
    "Drafter",
    "EarlyExitDrafter",
    "GenerationResult",
    "PromptLookupDrafter",
    "RequestResult",
    "SpeculativeDecoder",
    "StepRecord",
]
