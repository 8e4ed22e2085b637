"""Ours vs transformers on this machine: training step, greedy generation, peak memory.

Both models are the SmolLM2-135M architecture (config/smollm2-135m.yaml) with the same weights and
inputs, timed alternately in one run so that both see the same machine. Each training contender
lives in a process of its own (process-wide settings such as our allocator tuning stay its own, and
its peak memory is its own); generation runs in this process. Prints a Markdown section;
`bench/run.py` collects it into BENCHMARKS.md.

    python bench/model_bench.py [--runs 3] [--only train|generate]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from report import spread

from smollm2.config import load_config
from smollm2.cpu_packing import pack_for_cpu_inference
from smollm2.generation import Sampling, generate
from smollm2.hardware import flops_per_token, keep_freed_memory_on_cpu, measure_cpu_matmul_flops
from smollm2.hf import to_hf_state_dict, to_llama_config
from smollm2.model import LOGITS_PER_CHUNK, SmolLM2
from smollm2.trainer import make_optimizer, optimizer_step

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "smollm2-135m.yaml"
BATCH, SEQ = 4, 256
PROMPT_LEN, NEW_TOKENS = 32, 128
STEPS_PER_RUN = 2


# ---------------------------------------------------------------------------------------------
# The two contenders


def build_ours(seed: int = 0):
    config = load_config(CONFIG)
    torch.manual_seed(seed)
    return config, SmolLM2(config.model)


def build_theirs(config, weights_from: SmolLM2 | None = None):
    """transformers' LlamaForCausalLM for the same config (fp32), with our weights when given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**to_llama_config(config.model), attn_implementation="sdpa"))
    if weights_from is not None:
        model.load_state_dict(to_hf_state_dict(weights_from), strict=False)
        model.tie_weights()
    return model


def build_pair():
    config, ours = build_ours()
    return config, ours, build_theirs(config, ours)


def our_train_step(config, model: SmolLM2, compile_model: bool, full_logits: bool = False) -> Callable:
    """The trainer's step: forward with the chunked head + cross-entropy, backward, clip, fused AdamW.

    full_logits: the loss the usual way instead, F.cross_entropy on logits from the model.
    """
    optimizer = make_optimizer(model, config.train, torch.device("cpu"))
    forward = torch.compile(model) if compile_model else model

    def loss(inputs, targets) -> torch.Tensor:
        if full_logits:
            return F.cross_entropy(forward(inputs).flatten(0, 1).float(), targets.flatten())
        return forward(inputs, targets)

    def step(inputs, targets) -> None:
        loss(inputs, targets).backward()
        optimizer_step(model, optimizer, config.train.grad_clip)

    return step


def their_train_step(config, model, fused: bool = False) -> Callable:
    """What a transformers user writes: labels -> loss, backward, clip, torch AdamW (fused: one kernel for
    all parameters, as ours)."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay, fused=fused
    )

    def step(inputs, targets) -> None:
        model(input_ids=inputs, labels=inputs).loss.backward()  # transformers shifts the labels itself
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def batch(vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def timed(fn: Callable, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


# ---------------------------------------------------------------------------------------------
# Measurements


TRAINERS = ("ours", "ours, default allocator", "ours, compiled", "transformers")
# Timed apart from TRAINERS, each pair in a run of its own: five 4 GB contenders at once would crowd a 23 GB machine.
LOSS_CONTENDERS = ("ours", "ours, full logits")
TUNED = "transformers, our allocator setting + fused AdamW"
LIKE_FOR_LIKE = ("ours", TUNED)


def train_worker(name: str) -> None:
    """One contender in its own process (so that process-wide settings stay its own): on each
    "run" line from the parent, time STEPS_PER_RUN steps and answer with JSON."""
    config, ours = build_ours()
    if name not in ("ours, default allocator", "transformers"):
        keep_freed_memory_on_cpu()  # what Trainer does on a CPU
    if name.startswith("transformers"):
        step = their_train_step(config, build_theirs(config, ours), fused=name == TUNED)
        del ours
    else:
        step = our_train_step(
            config, ours, compile_model=name == "ours, compiled", full_logits=name == "ours, full logits"
        )
    inputs, targets = batch(config.model.vocab_size, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    step(inputs, targets)  # compiles, allocates the optimizer state
    first = time.perf_counter() - start
    step(inputs, targets)
    print(json.dumps({"ready": True, "first_step": first}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = timed(lambda: step(inputs, targets), STEPS_PER_RUN)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / STEPS_PER_RUN
            print(json.dumps({"seconds": seconds, "peak_rss": peak_rss(), "faults": faults}), flush=True)


def peak_rss() -> int:
    """This process's high-water resident memory (VmHWM; unlike ru_maxrss it is not inherited on exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_train(runs: int, names: tuple[str, ...]) -> dict:
    """The contenders in their own processes, started one at a time, then timed in turn each run,
    each run starting with the next contender, so that none is always the one after a given other."""
    workers, first_step = {}, {}
    for name in names:
        workers[name] = subprocess.Popen(
            [sys.executable, __file__, "--worker", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        first_step[name] = json.loads(workers[name].stdout.readline())["first_step"]
    seconds, peaks, faults = {name: [] for name in names}, {}, {name: [] for name in names}
    for run in range(runs):
        for name in names[run % len(names) :] + names[: run % len(names)]:
            worker = workers[name]
            worker.stdin.write("run\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            if not line:  # the worker died: on a crowded machine, most often the kernel's out-of-memory killer
                raise RuntimeError(f"training contender {name!r} ended (exit {worker.wait()}) before answering")
            answer = json.loads(line)
            seconds[name].append(answer["seconds"])
            faults[name].append(answer["faults"])
            peaks[name] = answer["peak_rss"]
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    config = load_config(CONFIG)
    flops = flops_per_token(config.model, SEQ) * BATCH * SEQ
    return {"seconds": seconds, "flops_per_step": flops, "first_step": first_step, "peak_rss": peaks, "faults": faults}


def bench_generate(runs: int) -> dict:
    config, ours, theirs = build_pair()
    ours.eval()
    theirs.eval()
    packed = pack_for_cpu_inference(ours)  # a new model: ours is left unpacked
    generator = torch.Generator().manual_seed(1)
    results = {}
    for batch_size in (1, 8):
        prompt = torch.randint(0, config.model.vocab_size, (batch_size, PROMPT_LEN), generator=generator)
        contenders = {
            "ours": lambda prompt=prompt: our_generate(ours, prompt),
            "ours (packed)": lambda prompt=prompt: our_generate(packed, prompt),
            "transformers": lambda prompt=prompt: their_generate(theirs, prompt),
        }
        outputs = {name: fn() for name, fn in contenders.items()}  # warm up, and check agreement
        seconds = {name: [] for name in contenders}
        for _ in range(runs):
            for name, fn in contenders.items():
                seconds[name].append(timed(fn, 1))
        agree = {name: out == outputs["transformers"] for name, out in outputs.items()}
        results[batch_size] = {"seconds": seconds, "agree": agree}
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    return {"results": results, "weight_bytes": weight_bytes, "bandwidth": measure_bandwidth()}


@torch.no_grad()
def our_generate(model: SmolLM2, prompt: torch.Tensor) -> list[list[int]]:
    return generate(model, prompt.tolist(), NEW_TOKENS, sampling=Sampling(temperature=0))


@torch.no_grad()
def their_generate(model, prompt: torch.Tensor) -> list[list[int]]:
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, PROMPT_LEN:].tolist()


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s read by a sum over a tensor far larger than the caches: the memory-bound ceiling."""
    data = torch.ones(megabytes * 2**20 // 4)
    data.sum()
    best = min(timed(data.sum, 1) for _ in range(repeats))
    return data.numel() * 4 / best


# ---------------------------------------------------------------------------------------------
# Report


def report(runs: int, train: dict | None, generate: dict | None, peak: float) -> str:
    lines = [
        "## Training and generation vs transformers",
        "",
        f"`python bench/model_bench.py --runs {runs}`. Model: `config/smollm2-135m.yaml` "
        "(134,515,008 parameters), fp32, no gradient checkpointing, both with the same weights and batch; "
        f"median (min-max) of {runs} runs, the contenders taking turns within each run (a ratio is taken run by "
        f"run, between contenders timed in the same run). transformers {_transformers_version()}, "
        "`LlamaForCausalLM` with `attn_implementation='sdpa'`.",
        "",
        f"fp32 matmul peak measured here (the best 2048x2048 matmul of three rounds): {peak / 1e9:.0f} GFLOPS.",
        "",
    ]
    if train:
        lines += training_table(train, peak)
    if generate:
        lines += generation_table(generate)
    return "\n".join(lines)


def ratios(base: list[float], other: list[float]) -> list[float]:
    """base / other, run by run (seconds of contenders timed in the same run)."""
    return [b / o for b, o in zip(base, other, strict=True)]


def train_rows(group: dict, base: str, peak: float | None) -> list[str]:
    """One row a contender: s/step, tokens/s, (MFU), speed against `base`, peak memory, first step."""
    tokens, rows = BATCH * SEQ, []
    for name, runs in group["seconds"].items():
        mfu = f" {100 * group['flops_per_step'] / statistics.median(runs) / peak:.0f}% |" if peak else ""
        rows.append(
            f"| {name} | {spread(runs, '{:.2f}')} | {spread([tokens / t for t in runs], '{:.0f}')} |{mfu} "
            f"{spread(ratios(group['seconds'][base], runs), '{:.2f}', 'x')} | "
            f"{group['peak_rss'][name] / 2**20:,.0f} | {group['first_step'][name]:.0f} s |"
        )
    return rows


def training_table(train: dict, peak: float) -> list[str]:
    seconds, like = train["seconds"], train["like"]
    lines = [
        f"Training step, micro-batch {BATCH} x {SEQ} tokens (forward, backward, clip, AdamW). What each gives a "
        "user by default: `ours` with what `Trainer` sets up on a CPU (the allocator setting "
        "`keep_freed_memory_on_cpu` and fused AdamW), `transformers` with neither (glibc's default allocator, "
        "torch's default AdamW), as a transformers user gets them unless they set them:",
        "",
        "| | s/step | tokens/s | MFU | vs transformers | peak memory (MiB) | first step |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *train_rows(train, "transformers", peak),
        "",
        "Like for like, timed in a run of their own: transformers given both of ours too (the allocator "
        "setting in its process, `torch.optim.AdamW(..., fused=True)`):",
        "",
        "| | s/step | tokens/s | MFU | vs transformers, like for like | peak memory (MiB) | first step |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *train_rows(like, TUNED, peak),
    ]
    loss = train["loss"]["seconds"]
    saved = (train["loss"]["peak_rss"]["ours, full logits"] - train["loss"]["peak_rss"]["ours"]) / 2**20
    faults = {name: statistics.median(f) for name, f in train["faults"].items()}
    bound = train["flops_per_step"] / peak
    vocab = load_config(CONFIG).model.vocab_size
    lines += [
        "",
        "Peak memory is the process's high-water resident set (weights, gradients, AdamW state, activations, "
        "and for the compiled step the compiler); the first step includes `torch.compile`'s compilation.",
        "",
        "What each change bought (`ours` is what `Trainer` runs on a CPU; ratios run by run):",
        "",
        "- Keeping freed memory in the heap (`keep_freed_memory_on_cpu`, glibc `mallopt`): "
        f"{spread(ratios(seconds['ours, default allocator'], seconds['ours']), '{:.2f}', 'x')}. Minor page faults "
        f"per step: {faults['ours, default allocator']:,.0f} with glibc's default, {faults['ours']:,.0f} with it: "
        "every activation and gradient above glibc's mmap threshold is unmapped when freed and faulted back "
        "in on the next step.",
        "- The head and the cross-entropy in one chunked function (`smollm2.model.linear_cross_entropy`), "
        "against logits from the model and `F.cross_entropy`, timed in a run of their own "
        f"(`ours` {spread(loss['ours'], '{:.2f}')} s/step, `ours, full logits` "
        f"{spread(loss['ours, full logits'], '{:.2f}')} s/step): "
        f"{spread(ratios(loss['ours, full logits'], loss['ours']), '{:.2f}', 'x')} in speed, as the head's three "
        f"matmuls are its cost either way, and {saved:,.0f} MiB less peak memory: the {BATCH * SEQ} x {vocab:,} "
        "logits and their gradient never exist whole. That is the point on a GPU, where a batch of 16k tokens "
        f"has {16384 * vocab * 4 / 1e9:.1f} GB of fp32 logits; chunks hold {LOGITS_PER_CHUNK * 4 / 2**20:.0f} MiB.",
        "- `torch.compile` (inductor) on top: "
        f"{spread(ratios(seconds['ours'], seconds['ours, compiled']), '{:.2f}', 'x')}; `train.compile` stays off "
        "by default on CPU.",
        "- Fused AdamW (one kernel for all parameters) and SDPA's flash kernel for CPU are in every `ours` row. "
        f"At the measured peak the matmuls alone need {bound:.2f} s per step, so no fp32 implementation of this "
        f"step can beat transformers by more than {statistics.median(seconds['transformers']) / bound:.2f}x here.",
    ]
    return lines


def generation_table(generate: dict) -> list[str]:
    lines = [
        "",
        f"Greedy generation, {NEW_TOKENS} new tokens after a {PROMPT_LEN}-token prompt (prompt time included), "
        "both in this process with the default allocator:",
        "",
        "| batch | | tokens/s | vs transformers | same tokens as transformers |",
        "|---:|---|---:|---:|---|",
    ]
    for batch_size, result in generate["results"].items():
        seconds = result["seconds"]
        for name, runs in seconds.items():
            rates = [batch_size * NEW_TOKENS / t for t in runs]
            same = "yes" if result["agree"][name] else "no"
            speedup = spread(ratios(seconds["transformers"], runs), "{:.2f}", "x")
            lines.append(f"| {batch_size} | {name} | {spread(rates)} | {speedup} | {same} |")
    one = generate["results"][1]
    best = min(statistics.median(s) for s in one["seconds"].values())
    limit = generate["bandwidth"] / generate["weight_bytes"]
    lines += [
        "",
        f"Memory-bandwidth limit at batch 1: every token reads all {generate['weight_bytes'] / 2**20:.0f} MiB of "
        f"weights; at the {generate['bandwidth'] / 1e9:.1f} GB/s a large sum reaches here that is "
        f"{limit:.1f} tokens/s. The fastest above (median) reaches {NEW_TOKENS / best / limit:.0%} of it.",
        "",
        "`ours (packed)` is `smollm2.cpu_packing.pack_for_cpu_inference` (what `smollm2 generate` and the Space "
        "use): every linear weight reordered once into oneDNN's blocked layout, q/k/v and gate/up fused into one "
        "matrix each. Decoding is a matrix-vector product per weight, so how fast each library's kernels stream "
        "the weights decides it, and that differs between CPUs; the many small ops of each layer (norms, "
        "rotary, cache, attention) take the rest of a step.",
    ]
    return lines


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=["train", "generate"])
    parser.add_argument("--worker", choices=TRAINERS + LOSS_CONTENDERS + LIKE_FOR_LIKE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.worker:
        train_worker(args.worker)
        return
    peaks = [measure_cpu_matmul_flops(2048)]
    train = None
    if args.only in (None, "train"):
        train = bench_train(args.runs, TRAINERS)
        train["loss"] = bench_train(args.runs, LOSS_CONTENDERS)
        train["like"] = bench_train(args.runs, LIKE_FOR_LIKE)
    peaks.append(measure_cpu_matmul_flops(2048))
    generate = bench_generate(args.runs) if args.only in (None, "generate") else None
    peaks.append(measure_cpu_matmul_flops(2048))
    # The machine's peak is the best it showed: a moment of contention only lowers a measurement.
    print(report(args.runs, train, generate, max(peaks)))


if __name__ == "__main__":
    main()
