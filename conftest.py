"""Collection rules: modules that need optional extras are skipped when those extras are absent."""

import importlib.util

collect_ignore = ["adaptk/adapters/vllm.py"]  # imported only inside a vLLM engine (tests/test_vllm_adapter.py)
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    collect_ignore += ["adaptk/decoding", "adaptk/record.py", "adaptk/adapters/hf.py", "adaptk/bench/reference.py"]
