"""Collection rules: modules that need optional extras are skipped when those extras are absent."""

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    collect_ignore += ["adaptk/decoding", "adaptk/record.py", "adaptk/adapters/hf.py", "adaptk/bench/reference.py"]
