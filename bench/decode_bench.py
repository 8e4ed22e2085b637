"""Batch-1 greedy decoding of the published SmolLM2-135M-Instruct: ours in each precision, transformers
fp32 `generate`, and llama.cpp (llama-cpp-python) on f32 / bf16 / q8_0 GGUFs, in one process, in turns.

Decoding speed = (NEW_TOKENS - 1) / (time for NEW_TOKENS tokens - time for 1 token): the prompt and the
first token are taken out, what is left is the per-token cost every reply pays. Every contender gets
the same prompt ids, the same thread count, and produces exactly NEW_TOKENS tokens (no stop at
end-of-text); each round runs them all, in an order that rotates. Prints a Markdown section: median
tokens/s, the spread (min-max over rounds) and the ratios to transformers and to llama.cpp at the same
weight precision (ours int8 against q8_0). With --startup, also `smollm2 generate --max_new_tokens 1`
as a whole process (start-up to the first token).

    python scripts/fetch_instruct.py     # once: the published weights, cached
    python bench/decode_bench.py [--rounds 5] [--threads 2] [--gguf DIR] [--startup]

DIR holds `*-f32.gguf`, `*-bf16.gguf`, `*-q8_0.gguf` (from `python -m smollm2 export --format gguf
--outtype ...`, or llama.cpp's convert_hf_to_gguf.py); without it our export writes them once beside the
cached model; without llama-cpp-python, the
llama.cpp rows are left out and the section says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_instruct import instruct_folder  # noqa: E402

from smollm2.generation import Sampling, generate  # noqa: E402
from smollm2.inference import load_for_inference  # noqa: E402
from smollm2.model import KVCache  # noqa: E402
from smollm2.tokenizer import load_tokenizer  # noqa: E402

CHOICES = "SMOLLM2_DECODE_CHOICES"  # where decoding choices are remembered (smollm2.hardware)
PROMPT = "The capital of France is"
NEW_TOKENS = 128
GGUF_KINDS = ("f32", "bf16", "q8_0")
PEER = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0"}  # our weights -> llama.cpp's of the same width
Decoder = Callable[[int], None]  # decode this many new tokens after the prompt


def ours(folder: Path, precision: str, ids: list[int]) -> tuple[str, Decoder]:
    model, _ = load_for_inference(folder, precision=precision)
    greedy = Sampling(temperature=0)
    return f"ours {precision} ({model.decode_precision.name})", lambda n: generate(model, [ids], n, sampling=greedy)


def transformers_fp32(folder: Path, ids: list[int]) -> tuple[str, Decoder]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])

    def decode(n: int) -> None:
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return "transformers fp32 generate", decode


def llama_cpp(path: Path, kind: str, ids: list[int], threads: int) -> tuple[str, Decoder]:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def decode(n: int) -> None:
        llm.reset()
        for produced, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True), start=1):
            if produced == n:
                break

    return f"llama.cpp {kind}", decode


def exported_ggufs(folder: Path) -> Path:
    """The published model as f32, bf16 and q8_0 GGUFs written by our export (cached beside the model)."""
    from smollm2.gguf_export import export_gguf
    from smollm2.hf import load_pretrained

    target = folder.parent / f"{folder.name}-gguf"
    target.mkdir(exist_ok=True)
    model, tokenizer = load_pretrained(folder)
    for kind in GGUF_KINDS:
        path = target / f"{folder.name}-{kind}.gguf"
        if not path.exists():
            export_gguf(model, tokenizer, path, kind, name=folder.name)
    return target


def contenders(folder: Path, ids: list[int], gguf: Path | None, threads: int) -> tuple[dict[str, Decoder], str]:
    found = dict(ours(folder, p, ids) for p in ("auto", "fp32", "bf16", "int8"))
    found.update([transformers_fp32(folder, ids)])
    note = ""
    if importlib.util.find_spec("llama_cpp") is None:
        return found, "llama.cpp rows left out: llama-cpp-python is not installed."
    if gguf is None:
        gguf = exported_ggufs(folder)
        note = "llama.cpp runs the GGUFs `python -m smollm2 export --format gguf --outtype f32|bf16|q8_0` writes. "
    for kind in GGUF_KINDS:
        path = next(gguf.glob(f"*-{kind}.gguf"), None)
        if path is None:
            note += f"no *-{kind}.gguf in {gguf}. "
            continue
        found.update([llama_cpp(path, kind, ids, threads)])
    return found, note.strip()


def race(decoders: dict[str, Decoder], rounds: int, new_tokens: int) -> dict[str, list[float]]:
    """name -> decoding tokens/s of each round (new_tokens - 1 tokens over their extra time)."""
    for decode in decoders.values():
        decode(4)  # warm up: kernels built, caches filled
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    names = list(decoders)
    for turn in range(rounds):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            start = time.perf_counter()
            decoders[name](1)
            first = time.perf_counter()
            decoders[name](new_tokens)
            rates[name].append((new_tokens - 1) / (time.perf_counter() - first - (first - start)))
    return rates


def startup(folder: Path, precision: str, choices: Path) -> float:
    """Seconds for `smollm2 generate --max_new_tokens 1` as a whole process, its decoding choices in `choices`."""
    argv = ["-m", "smollm2", "generate", "--model", str(folder), "--prompt", PROMPT, "--max_new_tokens", "1"]
    argv += ["--temperature", "0", "--precision", precision]
    start = time.perf_counter()
    subprocess.run([sys.executable, *argv], check=True, capture_output=True, env=os.environ | {CHOICES: str(choices)})
    return time.perf_counter() - start


def startup_lines() -> list[str]:
    """Start-up to the first token per precision: the first start on a machine (it measures the packed and
    plain paths) and later ones (best of 3: the choice is remembered), beside `import torch` alone."""
    folder = instruct_folder()
    lines = ["| `--precision` | first start (measures) | later starts (best of 3) |", "|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as scratch:
        for precision in ("auto", "fp32", "bf16", "int8"):
            choices = Path(scratch) / f"{precision}.json"
            first = startup(folder, precision, choices)
            later = min(startup(folder, precision, choices) for _ in range(3))
            lines.append(f"| {precision} | {first:.2f} s | {later:.2f} s |")
    torch_alone = min(run_seconds([sys.executable, "-c", "import torch"]) for _ in range(3))
    return [*lines, "", f'`python -c "import torch"` alone: {torch_alone:.2f} s (best of 3).']


def run_seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def step_profile(folder: Path, ids: list[int], steps: int = 20) -> list[str]:
    """Where a decode step of `--precision auto` spends its time (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    model, _ = load_for_inference(folder, precision="auto")
    cache = KVCache(model.config, 1, len(ids) + steps + 8, "cpu", model.embed_tokens.weight.dtype)
    token = torch.tensor([ids[-1:]])
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=cache)
        for _ in range(3):
            model.decode_step(token, cache)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                model.decode_step(token, cache)
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) / steps / 1e3
    calls = sum(event.count for event in events) / steps
    share = {bucket: 0.0 for bucket in PROFILE_BUCKETS}
    for event in events:
        bucket = next((b for b, names in PROFILE_BUCKETS.items() if any(n in event.key for n in names)), "the rest")
        share[bucket] = share.get(bucket, 0.0) + event.self_cpu_time_total / steps / 1e3
    parts = ", ".join(f"{bucket} {ms:.1f} ms ({ms / total:.0%})" for bucket, ms in share.items())
    return [
        f"A decode step of `--precision auto` ({model.decode_precision.name}) under torch.profiler, {steps} steps: "
        f"{total:.1f} ms a step (the profiler adds its own), {calls:.0f} operator calls: {parts}."
    ]


PROFILE_BUCKETS = {  # operator names (self time) -> what they are
    "matrix-vector products": ("linear_pointwise", "int8pack_mm", "aten::mm", "aten::addmm", "aten::linear"),
    "attention": ("scaled_dot_product",),
    "norms": ("rms_norm", "aten::pow", "aten::mean", "aten::rsqrt"),
}


def table(rates: dict[str, list[float]]) -> list[str]:
    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median.get("transformers fp32 generate")
    lines = ["| decoder | tokens/s (median) | min-max | vs transformers fp32 | vs llama.cpp, same width |"]
    lines.append("|---|---:|---:|---:|---:|")
    for name, r in rates.items():
        precision = name.split()[1] if name.startswith("ours") else ""
        peer = median.get(f"llama.cpp {PEER.get(precision, '')}")
        versus = f"{median[name] / peer:.2f}x ({PEER[precision]})" if peer else ""
        lines.append(
            f"| {name} | {median[name]:.1f} | {min(r):.1f}-{max(r):.1f} | {median[name] / base:.2f}x | {versus} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=NEW_TOKENS)
    parser.add_argument(
        "--gguf", type=Path, help="a folder of *-f32.gguf, *-bf16.gguf, *-q8_0.gguf (default: our export's, cached)"
    )
    parser.add_argument("--startup", action="store_true", help="also time `generate --max_new_tokens 1` processes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = instruct_folder()
    ids = load_tokenizer(folder).encode(PROMPT)
    command = " ".join(["python bench/decode_bench.py", *sys.argv[1:]])
    print(f"## Decoding speed against transformers and llama.cpp (`{command}`)\n")
    decoders, note = contenders(folder, ids, args.gguf, args.threads)
    rates = race(decoders, args.rounds, args.new_tokens)
    new = args.new_tokens
    print(
        f"The published SmolLM2-135M-Instruct, greedy, batch 1, {args.threads} threads, {new} new tokens after "
        f"{len(ids)} prompt tokens; tokens/s = {new - 1} / (time for {new} - time for 1), in one "
        f"process, {args.rounds} rounds, the decoders taking turns. {note}\n"
    )
    print("\n".join(table(rates)))
    print("\n" + "\n".join(step_profile(folder, ids)))
    if args.startup:
        print("\nStart-up to the first token (`smollm2 generate --max_new_tokens 1`, whole process):\n")
        print("\n".join(startup_lines()))


if __name__ == "__main__":
    main()
