"""Reference decoder with speculation off (k = 0 for all) vs Hugging Face ``model.generate`` greedy.

Same SmolLM2-135M, same Spec-Bench prompts, batch 1 and 8, alternating the two engines each rep
and taking the median. Also reports the decoder's Python overhead: step time spent outside model
forwards at batch 1. Writes ``benchmarks/results/reference.json`` and prints a table.

    python benchmarks/bench_reference.py [--new-tokens 64] [--reps 3] [--threads 2]

Targets: >= 0.9x generate at batch 1, >= 1.0x at batch 8, overhead < 10%. On a shared CPU the
numbers are noisy; compare medians, not single runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from adaptk.decoding import SpeculativeDecoder
from adaptk.decoding.models import load_model
from adaptk.record import load_prompts

OUT = Path(__file__).parent / "results" / "reference.json"


def hf_generate(model, prompts, new_tokens, pad_id):
    """Greedy ``generate`` on left-padded prompts, exactly ``new_tokens`` each (no EOS stop)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_id)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    elapsed = time.perf_counter() - t
    assert out.shape[1] - width == new_tokens
    return len(prompts) * new_tokens / elapsed


def reference(decoder, prompts, new_tokens):
    t = time.perf_counter()
    result = decoder.generate(prompts, max_new_tokens=new_tokens, eos_token_id=None)
    elapsed = time.perf_counter() - t
    assert result.num_tokens == len(prompts) * new_tokens
    return result.num_tokens / elapsed, result.overhead_fraction


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    model, tokenizer = load_model("smollm2-135m-instruct", num_threads=args.threads)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pool = [list(p.input_ids) for p in load_prompts(tokenizer, per_task=2)]
    decoder = SpeculativeDecoder(model, controller={"name": "fixed", "params": {"k": 0}}, k_max=0)
    reference(decoder, pool[:1], 4)  # warm both engines up
    hf_generate(model, pool[:1], 4, pad_id)

    rows = []
    for batch in (1, 8):
        prompts = pool[:batch]
        hf, ours, overhead = [], [], []
        for _ in range(args.reps):  # alternate so drifting CPU load hits both alike
            hf.append(hf_generate(model, prompts, args.new_tokens, pad_id))
            tps, frac = reference(decoder, prompts, args.new_tokens)
            ours.append(tps)
            overhead.append(frac)
        row = {
            "batch_size": batch,
            "new_tokens": args.new_tokens,
            "reps": args.reps,
            "hf_generate_tok_s": statistics.median(hf),
            "reference_plain_tok_s": statistics.median(ours),
            "speedup_vs_generate": statistics.median(ours) / statistics.median(hf),
            "overhead_fraction": statistics.median(overhead),
            "hf_generate_all": hf,
            "reference_plain_all": ours,
        }
        rows.append(row)
        print(f"batch {batch}: generate {row['hf_generate_tok_s']:.1f} tok/s, reference {row['reference_plain_tok_s']:.1f} "
              f"tok/s (x{row['speedup_vs_generate']:.2f}), overhead {100 * row['overhead_fraction']:.1f}%", flush=True)

    print("\n| batch | generate tok/s | reference (k=0) tok/s | ratio | overhead outside forwards |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['hf_generate_tok_s']:.1f} | {r['reference_plain_tok_s']:.1f} | "
              f"x{r['speedup_vs_generate']:.2f} | {100 * r['overhead_fraction']:.1f}% |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "reference decoder (k=0) vs transformers generate, greedy, SmolLM2-135M-Instruct fp32",
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "note": "shared CPU: other processes ran concurrently; medians of alternating reps",
        "rows": rows,
    }, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
