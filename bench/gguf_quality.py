"""What `export --format gguf` costs per --outtype, on the published SmolLM2-135M-Instruct: the file's
size, the time to write it, and llama.cpp's mean NLL (and perplexity) on a passage of input.txt
against f32 and against our own fp32 model; greedy agreement with f32 over 64 tokens.

    python bench/gguf_quality.py [--tokens 1024]

llama.cpp (llama-cpp-python) runs with 2 threads and its keys and values cached in f32, so that
the figures are the weights' alone. Prints a markdown section.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from fetch_instruct import cache_folder  # noqa: E402

from smollm2.generation import Sampling, generate  # noqa: E402
from smollm2.gguf_export import OUTTYPES, export_gguf  # noqa: E402
from smollm2.hf import load_pretrained  # noqa: E402

WINDOW = 512
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def windows(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + WINDOW] for i in range(0, len(ids) - 1, WINDOW) if len(ids[i : i + WINDOW]) > 1]


def llama_nll(model, ids: list[int]) -> tuple[float, int]:
    model.reset()
    model.eval(ids)
    logits = np.asarray(model.scores[: len(ids) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def our_nll(model, ids: list[int]) -> tuple[float, int]:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].double()
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")), len(ids) - 1


def mean(scored: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in scored) / sum(n for _, n in scored)


def llama_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    model.reset()
    model.eval(prompt)
    out: list[int] = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval(out[-1:])
    return out


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens alike before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def main() -> None:
    from llama_cpp import GGML_TYPE_F32, Llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of input.txt scored")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_pretrained(cache_folder())
    model.eval()
    ids = tokenizer.encode((ROOT / "input.txt").read_text()[-args.tokens * 8 :])[-args.tokens :]
    ours = mean([our_nll(model, w) for w in windows(ids)])
    prompt = tokenizer.encode(PROMPT)
    reference = generate(model, [prompt], 64, sampling=Sampling(temperature=0.0))[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for outtype in OUTTYPES:
            path = Path(folder) / f"instruct-{outtype}.gguf"
            start = time.perf_counter()
            export_gguf(model, tokenizer, path, outtype)
            seconds = time.perf_counter() - start
            llm = Llama(
                str(path),
                n_ctx=1024,
                n_threads=2,
                logits_all=True,
                type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32,
                verbose=False,
            )
            nll = mean([llama_nll(llm, w) for w in windows(ids)])
            agreed = agreement(llama_greedy(llm, prompt, 64), reference)
            llm.close()
            rows.append((outtype, path.stat().st_size, seconds, nll, agreed))
    f32 = rows[0][3]
    print("## GGUF export (published SmolLM2-135M-Instruct)\n")
    print(
        f"`python bench/gguf_quality.py --tokens {args.tokens}`: {len(ids)} tokens of input.txt in windows of {WINDOW};"
    )
    print(f"our fp32 model: mean NLL {ours:.5f} (perplexity {math.exp(ours):.3f}).\n")
    print(
        "| outtype | file | export | llama.cpp mean NLL | perplexity | vs f32 | greedy tokens equal to ours (of 64) |"
    )
    print("|---|---|---|---|---|---|---|")
    for outtype, size, seconds, nll, agreed in rows:
        print(
            f"| {outtype} | {size / 2**20:.1f} MiB | {seconds:.1f} s | {nll:.5f} | {math.exp(nll):.3f} "
            f"| {nll - f32:+.5f} | {agreed} |"
        )


if __name__ == "__main__":
    main()
