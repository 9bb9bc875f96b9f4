"""Adapters that plug adaptk controllers into real decoders.

* :mod:`adaptk.adapters.hf` — Hugging Face ``generate`` (assisted decoding, prompt lookup, early exit).
* :mod:`adaptk.adapters.vllm` — a vLLM engine's scheduler: the speculation length of every engine
  step comes from a controller, which learns from what vLLM accepted.

Importing this package imports neither torch, transformers nor vLLM; each adapter imports its engine
lazily.
"""
