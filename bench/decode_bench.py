"""Greedy decoding, packed (smollm2.inference) vs unpacked, timed in turns in one process.

A quick check of what packing buys, for a change to the model or to packing: SmolLM2-135M
(config/smollm2-135m.yaml) with random weights, NEW_TOKENS greedy tokens after a PROMPT_LEN-token
prompt at batch 1, the contenders alternating (their order rotating) each round. Prints the median
tokens/s of each and whether they produced the same tokens. bench/model_bench.py is the full
comparison (transformers, batch 8, peak memory).

    python bench/decode_bench.py [--rounds 4] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from smollm2.config import load_config
from smollm2.cpu_packing import pack_for_cpu_inference
from smollm2.generation import Sampling, generate
from smollm2.model import SmolLM2

CONFIG = Path(__file__).resolve().parents[1] / "config" / "smollm2-135m.yaml"
PROMPT_LEN, NEW_TOKENS = 16, 128


def contenders() -> dict[str, SmolLM2]:
    torch.manual_seed(0)
    model = SmolLM2(load_config(CONFIG).model).eval()
    return {"unpacked": model, "packed": pack_for_cpu_inference(model)}


def race(models: dict[str, SmolLM2], rounds: int) -> dict[str, dict]:
    """name -> tokens/s of each round and whether its tokens match the first contender's."""
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1)).tolist()
    greedy = Sampling(temperature=0)
    outputs = {name: generate(model, prompt, NEW_TOKENS, sampling=greedy) for name, model in models.items()}
    first = next(iter(outputs.values()))
    results = {name: {"rates": [], "same": out == first} for name, out in outputs.items()}
    names = list(models)
    for turn in range(rounds):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            start = time.perf_counter()
            generate(models[name], prompt, NEW_TOKENS, sampling=greedy)
            results[name]["rates"].append(NEW_TOKENS / (time.perf_counter() - start))
    return results


def report(results: dict[str, dict]) -> str:
    lines = [f"greedy, {NEW_TOKENS} new tokens after {PROMPT_LEN}, batch 1, {torch.get_num_threads()} threads"]
    for name, result in results.items():
        rates = " ".join(f"{rate:.1f}" for rate in result["rates"])
        median = statistics.median(result["rates"])
        lines.append(f"  {name:<12} {median:6.1f} tokens/s (median; rounds: {rates}), same tokens: {result['same']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(report(race(contenders(), args.rounds)))


if __name__ == "__main__":
    main()
