"""Copy-heavy prompts at batch 1: the reference decoder with ``adaptk`` vs Hugging Face prompt lookup.

``testbed.md`` measured HF's prompt lookup at ×1.85–3.24 over plain decoding on prompts whose
answer copies its input (summaries, QA over a given paragraph). This runs that kind of prompt
through, side by side in one process, interleaved (every repetition runs every configuration on
every prompt, in a rotating order):

- ``hf plain``: ``model.generate`` greedy; ``hf k=3`` / ``hf k=10``: with ``prompt_lookup_num_tokens``;
- ``reference plain``: the bundled decoder with ``k = 0``; ``reference adaptk``: the bundled decoder,
  prompt lookup, the flagship with the measured CPU profile as its cost model (as
  ``adaptk bench --engine reference`` runs it), ``k_max`` 16.

SmolLM2-135M-Instruct, greedy, up to ``--new-tokens`` per prompt, stopping at the model's EOS
(every output is checked against HF's plain output, so every configuration emits the same
tokens). Tokens/s per configuration = all new tokens / all wall time in one repetition; the table
reports the median over repetitions::

    python benchmarks/bench_copy_heavy.py [--reps 3] [--new-tokens 128]      # ~4 min

Writes ``benchmarks/results/copy-heavy.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from adaptk.bench.runner import build_controller
from adaptk.decoding import SpeculativeDecoder
from adaptk.decoding.models import load_model

OUT = Path(__file__).parent / "results" / "copy-heavy.json"

PASSAGE = (
    "The lighthouse on Marrow Point was built in 1871 from granite quarried on the island itself. "
    "Its lamp burned whale oil until 1890, then kerosene, and it was electrified in 1934 when a cable "
    "was laid across the strait. The last keeper, Agnes Holloway, kept the light for twenty-six years "
    "and wrote a daily log that recorded the weather, the ships that passed, and every repair she made "
    "to the lens. The log is now kept in the town library, where visitors can read it on Saturdays."
)
NOTICE = (
    "Residents are reminded that the recycling collection moves from Tuesday to Thursday starting "
    "next month. Glass, paper and metal cans go in the blue bin; food waste goes in the green bin; "
    "everything else goes in the black bin. Bins must be at the kerb by seven in the morning and "
    "brought back in by nine in the evening. Questions can be sent to the council office."
)
PROMPTS = [
    f"Repeat the following passage exactly, word for word.\n\n{PASSAGE}",
    f"Read the passage and answer the questions, quoting the passage.\n\n{PASSAGE}\n\n"
    "When was the lighthouse built, what did its lamp burn, and where is the keeper's log kept?",
    f"Summarize this notice in a few sentences, keeping its wording.\n\n{NOTICE}",
    f"Fix the spelling mistakes and write out the whole corrected text.\n\n"
    f"{NOTICE.replace('collection', 'colection').replace('month', 'mnth').replace('morning', 'mornin')}",
]
CONFIGS = ["hf plain", "hf k=3", "hf k=10", "reference plain", "reference adaptk"]


def hf_generate(model, ids: list[int], new_tokens: int, lookup: int | None, eos: int) -> list[int]:
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                              prompt_lookup_num_tokens=lookup)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=config)
    return out[0, len(ids):].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    model, tokenizer = load_model("smollm2-135m-instruct", num_threads=args.threads)
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                       add_generation_prompt=True), add_special_tokens=False).input_ids
               for p in PROMPTS]
    eos = int(tokenizer.eos_token_id)
    plain_decoder = SpeculativeDecoder(model, controller={"name": "fixed", "params": {"k": 0}}, k_max=0)

    def run(config: str, ids: list[int]) -> list[int]:
        if config.startswith("hf"):
            lookup = None if config == "hf plain" else int(config.split("=")[1])
            return hf_generate(model, ids, args.new_tokens, lookup, eos)
        decoder = plain_decoder if config == "reference plain" else SpeculativeDecoder(
            model, controller=build_controller("adaptk", "smollm2-135m-cpu", drafter="prompt_lookup"), k_max=16)
        return list(decoder.generate([ids], max_new_tokens=args.new_tokens, eos_token_id=eos)[0].tokens)

    for config in CONFIGS:  # warm-up
        run(config, prompts[0][:64])
    expected = [run("hf plain", ids) for ids in prompts]
    tokens = sum(map(len, expected))
    seconds: dict[str, list[float]] = {c: [] for c in CONFIGS}
    mismatches: dict[str, int] = dict.fromkeys(CONFIGS, 0)
    for rep in range(args.reps):
        order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[: rep % len(CONFIGS)]
        spent = dict.fromkeys(CONFIGS, 0.0)
        for i, ids in enumerate(prompts):
            for config in order:
                start = time.perf_counter()
                out = run(config, ids)
                spent[config] += time.perf_counter() - start
                mismatches[config] += out != expected[i]
        for config in CONFIGS:
            seconds[config].append(spent[config])
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{c} {tokens / spent[c]:.1f}" for c in CONFIGS), flush=True)

    rates = {c: statistics.median(tokens / s for s in seconds[c]) for c in CONFIGS}
    print("\n| configuration | tok/s | × hf plain | × reference plain | outputs ≠ plain |")
    print("|---|---|---|---|---|")
    for c in CONFIGS:
        print(f"| {c} | {rates[c]:.1f} | ×{rates[c] / rates['hf plain']:.2f} | "
              f"×{rates[c] / rates['reference plain']:.2f} | {mismatches[c]} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/bench_copy_heavy.py", "reps": args.reps, "max_new_tokens": args.new_tokens,
        "new_tokens_per_prompt": [len(e) for e in expected],
        "prompts": PROMPTS, "tokens_per_s_median": rates, "seconds_per_rep": seconds, "mismatches": mismatches,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
