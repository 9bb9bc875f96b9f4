"""Torch-based decoding: real model loading, drafters and the reference decoder.

Nothing here is imported by ``import adaptk``; users import these modules explicitly, which keeps
torch and transformers optional extras.
"""
