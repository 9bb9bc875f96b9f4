"""Property-based: random valid step streams never crash a controller or push it out of range."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaptk
from adaptk import Feedback, StepContext

BUILT_IN = [n for n in adaptk.available() if adaptk.get_class(n).__module__.startswith("adaptk.controllers")]


@st.composite
def streams(draw):
    k_max = draw(st.integers(0, 12))
    steps = []
    live: list[int] = []
    next_id = 0
    for _ in range(draw(st.integers(1, 25))):
        for _ in range(draw(st.integers(0, 3))):
            live.append(next_id)
            next_id += 1
        if not live:
            live.append(next_id)
            next_id += 1
        n = len(live)
        steps.append({
            "seq_ids": list(live),
            "context_lens": draw(st.lists(st.integers(1, 4000), min_size=n, max_size=n)),
            "avail": draw(st.lists(st.integers(0, k_max), min_size=n, max_size=n)),
            "accept_fraction": draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)),
            "probs": draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)),
            "verify_time_s": draw(st.floats(0.0, 2.0)),
            "draft_time_s": draw(st.floats(0.0, 0.5)),
            "end": draw(st.lists(st.booleans(), min_size=n, max_size=n)),
        })
        live = [s for s, e in zip(live, steps[-1]["end"], strict=True) if not e]
    return k_max, steps


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a NaN or overflow inside a controller fails the test
@pytest.mark.parametrize("name", BUILT_IN)
@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams())
def test_random_valid_streams(name, stream):
    k_max, steps = stream
    controller = adaptk.make(name)
    for step, s in enumerate(steps):
        n = len(s["seq_ids"])
        context = StepContext(step=step, seq_ids=s["seq_ids"], context_lens=s["context_lens"], k_max=k_max,
                              num_layers=12, exit_layers=(4, 8), draft_available=s["avail"],
                              match_ngram_lens=[min(a, 3) for a in s["avail"]])
        decision = controller.decide(context)
        k = decision.num_draft_tokens
        assert k.shape == (n,) and np.all((0 <= k) & (k <= k_max))
        drafted = np.minimum(k, s["avail"])
        accepted = np.floor(drafted * np.asarray(s["accept_fraction"])).astype(np.int64)
        width = max(1, int(drafted.max()))
        probs = np.repeat(np.asarray(s["probs"])[:, None], width, axis=1)
        compared = np.repeat((accepted + 1)[:, None], 12, axis=1)
        controller.update(Feedback(seq_ids=s["seq_ids"], num_draft_tokens=drafted, num_accepted_tokens=accepted,
                                   draft_time_s=s["draft_time_s"], verify_time_s=s["verify_time_s"], step=step,
                                   exit_layer=decision.exit_layer, draft_probs=probs, draft_entropies=1.0 - probs,
                                   kl_divergences=probs, layer_matches=compared // 2, layer_compared=compared))
        for seq_id, ended in zip(s["seq_ids"], s["end"], strict=True):
            if ended:
                controller.on_sequence_end(seq_id)
    final = controller.decide(StepContext(step=len(steps), seq_ids=[10_000], context_lens=[10], k_max=k_max))
    assert 0 <= int(final.num_draft_tokens[0]) <= k_max
