"""The CUDA fast path, checked on a real card (bench/gpu_check.sh runs this on one GPU).

Prints: which attention kernel SDPA ran; bf16-autocast vs fp32 losses over a few steps; tokens/s,
MFU and peak memory for each preset at sequence length 2048 (bf16, fused AdamW), one thing changed
at a time: eager, then compiled (both without gradient checkpointing), then eager with gradient
checkpointing; document masks (data.document_mask): packed documents against each alone, the kernel
the mask runs on, and tokens/s against plain causal. `--device cpu` runs a small smoke version.
`--markdown` prints it as BENCHMARKS.md's GPU section (`make bench-gpu` writes bench/results/gpu.md).

    python bench/gpu_check.py [--batch_size 8] [--seq_len 2048] [--steps 10] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from smollm2.config import load_config
from smollm2.distributed import checkpoint_blocks
from smollm2.hardware import flops_per_token, peak_flops
from smollm2.model import SmolLM2
from smollm2.trainer import make_optimizer, optimizer_step

ROOT = Path(__file__).resolve().parents[1]
PRESETS = [
    "config/model_config.yaml",
    "config/smollm2-135m.yaml",
    "config/smollm2-360m.yaml",
    "config/smollm2-1.7b.yaml",
]
ATTENTION_KERNELS = ("flash", "efficient", "cudnn", "math", "FlashAttn")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def random_batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def attention_backend(model: SmolLM2, device: torch.device, bf16: bool, documents: int = 0) -> str:
    """The attention kernels the profiler saw in one forward pass: verified, not assumed."""
    inputs, targets = random_batch(model.config.vocab_size, 1, 256, device)
    extra = {"document_ids": document_ids_of(1, 256, documents, device)} if documents else {}
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profile, torch.no_grad(), autocast(device, bf16):
        model(inputs, targets, **extra)
    names = {e.name for e in profile.events() if "attention" in e.name.lower() or "attn" in e.name.lower()}
    found = sorted(n for n in names if any(kernel in n for kernel in ATTENTION_KERNELS))
    return ", ".join(found) or "none recognised (" + ", ".join(sorted(names)) + ")"


def document_ids_of(batch: int, seq: int, documents: int, device: torch.device) -> torch.Tensor:
    """`documents` documents of equal length packed in each window."""
    return (torch.arange(seq, device=device) * documents // seq).expand(batch, seq)


def packed_against_alone(config, device: torch.device, seq: int, bf16: bool) -> float:
    """Three documents packed in one window with document_ids, against each run on its own: the
    largest logit difference, relative to the largest logit."""
    torch.manual_seed(0)
    model = SmolLM2(config.model).to(device).eval()
    lengths = [seq // 2, seq // 3, seq - seq // 2 - seq // 3]
    inputs, _ = random_batch(config.model.vocab_size, 1, seq, device)
    ids = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(lengths, device=device))[None]
    with torch.no_grad(), autocast(device, bf16):
        packed = model(inputs, document_ids=ids).float()
        alone = torch.cat([model(piece).float() for piece in inputs.split(lengths, dim=1)], dim=1)
    return ((packed - alone).abs().max() / alone.abs().max()).item()


def loss_agreement(config, device: torch.device, steps: int, seq: int) -> list[tuple[float, float]]:
    """The same init and batches trained in fp32 and in bf16 autocast; their losses side by side."""
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = SmolLM2(config.model).to(device)
        optimizer = make_optimizer(model, config.train, device)
        for group in optimizer.param_groups:
            group["lr"] = 3e-4
        row = []
        for step in range(steps):
            inputs, targets = random_batch(config.model.vocab_size, 2, seq, device, seed=step % 2)
            with autocast(device, bf16):
                loss = model(inputs, targets)
            loss.backward()
            optimizer_step(model, optimizer, 1.0)
            row.append(loss.item())
        losses[bf16] = row
        del model, optimizer
    return list(zip(losses[False], losses[True], strict=True))


def throughput(
    config, device, batch: int, seq: int, steps: int, compile_model: bool, checkpointing: bool, documents: int = 0
) -> dict:
    torch.manual_seed(0)
    model = SmolLM2(config.model).to(device)
    if checkpointing:
        checkpoint_blocks(model)
    optimizer = make_optimizer(model, config.train, device)
    forward = torch.compile(model) if compile_model else model
    inputs, targets = random_batch(config.model.vocab_size, batch, seq, device)
    extra = {"document_ids": document_ids_of(batch, seq, documents, device)} if documents else {}
    bf16 = device.type == "cuda"

    def step() -> None:
        with autocast(device, bf16):
            loss = forward(inputs, targets, **extra)
        loss.backward()
        optimizer_step(model, optimizer, 1.0)

    start = time.perf_counter()
    step()  # compiles
    sync(device)
    first = time.perf_counter() - start
    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = batch * seq
    peak = peak_flops(device, torch.bfloat16 if bf16 else None)
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "tokens_per_sec": tokens / seconds,
        "mfu": flops_per_token(config.model, seq) * tokens / seconds / peak if peak else None,
        "peak_memory": memory,
        "first_step": first,
    }


def document_mask_check(config, device, batch: int, seq: int, steps: int, document_len: int) -> None:
    """Windows packing documents of `document_len` tokens (document_ids: no attention across them,
    positions restarting) against the plain causal path: the same logits as each document alone,
    and the training speed of both, eager, bf16 on CUDA."""
    torch.manual_seed(0)
    model = SmolLM2(config.model).to(device)
    bf16 = device.type == "cuda"
    documents = torch.randint(0, config.model.vocab_size, (1, seq), device=device)
    document_ids = (torch.arange(seq, device=device) // document_len).unsqueeze(0)
    with torch.no_grad(), autocast(device, bf16):
        packed = model(documents, document_ids=document_ids).float()
        alone = torch.cat([model(part).float() for part in documents.split(document_len, dim=1)], dim=1)
    scale = alone.abs().max().item()
    print(
        f"  packed vs alone, {seq // document_len} documents of {document_len}: max |diff| "
        f"{(packed - alone).abs().max().item():.3g} (logits up to {scale:.3g})"
    )
    optimizer = make_optimizer(model, config.train, device)
    inputs, targets = random_batch(config.model.vocab_size, batch, seq, device)
    for label, extra in (("plain causal", {}), ("document_ids", {"document_ids": document_ids.expand(batch, -1)})):
        for timed in range(steps + 1):
            if timed == 1:  # the first step warms up
                sync(device)
                start = time.perf_counter()
            with autocast(device, bf16):
                loss = model(inputs, targets, **extra)
            loss.backward()
            optimizer_step(model, optimizer, 1.0)
        sync(device)
        print(f"  {label}: {batch * seq * steps / (time.perf_counter() - start):,.0f} tokens/s (eager)")


def with_attention(config, kernel: str):
    changed = load_config(config.source)
    changed.model.attention = kernel
    return changed


def measured(run, *args) -> str:
    """One throughput measurement described, or why there is none (a preset too big for the card)."""
    try:
        return describe(run(*args))
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return f"out of memory ({str(error).splitlines()[0][:120]})"


def seed_job(steps: int, config: str) -> str:
    """`python train.py --config config/model_config.yaml --train_steps N` as a user runs it (wandb off):
    the whole command's wall time, and the median tokens/s of its steps after the first tenth."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / config)]
        command += ["--train_steps", str(steps), "--out_dir", folder, "--set", "train.wandb=false"]
        command += ["data.path=" + str(ROOT / "input.txt"), f"train.save_every={steps}"]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            return f"failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}"
        rows = [json.loads(line) for line in open(Path(folder) / "logs" / "metrics.jsonl")]
    speeds = [row["tokens_per_sec"] for row in rows if "tokens_per_sec" in row and row["step"] > steps // 10]
    tokens_per_step = rows[-1].get("tokens", 0) / max(rows[-1]["step"], 1)
    median = statistics.median(speeds)
    projected = 5000 * tokens_per_step / median / 60 if tokens_per_step else float("nan")
    return (
        f"{wall:.0f} s for the whole command (tokenizer, data, compilation included); steps at "
        f"{median:,.0f} tokens/s (median), so 5000 steps' training steps alone in about {projected:.1f} minutes"
    )


def describe(result: dict) -> str:
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a"
    memory = f"{result['peak_memory'] / 2**30:.1f} GiB" if result["peak_memory"] is not None else "n/a (CPU)"
    return (
        f"{result['tokens_per_sec']:,.0f} tokens/s, MFU {mfu}, peak memory {memory}, "
        f"first step {result['first_step']:.0f} s"
    )


def settings(no_compile: bool) -> list[tuple[bool, bool]]:
    """(compiled, checkpointing) pairs that change one thing at a time: eager against compiled without
    checkpointing, and without against with checkpointing in eager mode (one compilation a preset)."""
    return [(False, False), *([] if no_compile else [(True, False)]), (False, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--seed_steps", type=int, default=0, help="also run the seed's train.py command this long")
    parser.add_argument("--seed_config", default="config/model_config.yaml")
    parser.add_argument("--markdown", action="store_true", help="as BENCHMARKS.md's GPU section")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.markdown:
        print("## GPU: the CUDA fast path (`bash bench/gpu_check.sh`)\n\n```text")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__} -- a smoke run only")
    bf16 = device.type == "cuda"
    first = load_config(ROOT / args.presets[-1])

    model = SmolLM2(first.model).to(device)
    print(f"attention ({args.presets[-1]}, {'bf16' if bf16 else 'fp32'}): {attention_backend(model, device, bf16)}")
    del model

    print(f"\nfp32 vs bf16 autocast, {args.presets[-1]}, 6 steps at 2 x {min(args.seq_len, 512)}:")
    pairs = loss_agreement(first, device, 6, min(args.seq_len, 512)) if bf16 else []
    for step, (fp32, half) in enumerate(pairs, 1):
        print(f"  step {step}: fp32 {fp32:.4f}  bf16 {half:.4f}  diff {abs(fp32 - half) / fp32:.2%}")
    if not pairs:
        print("  skipped: bf16 is not the fast path on this device")

    print(f"\ndocument masks ({args.presets[-1]}, {'bf16' if bf16 else 'fp32'}):")
    difference = packed_against_alone(first, device, min(args.seq_len, 512), bf16)
    print(f"  3 packed documents vs each alone: largest logit difference {difference:.2e} of the largest logit")
    model = SmolLM2(first.model).to(device)
    print(f"  attention kernel with 8 documents a window: {attention_backend(model, device, bf16, documents=8)}")
    del model
    kernels = [("sdpa", 0), ("sdpa", 8)] + ([("flex", 8)] if device.type == "cuda" else [])
    for kernel, documents in kernels:  # flex_attention trains on CUDA only (no CPU backward)
        config = with_attention(first, kernel)
        result = measured(
            throughput, config, device, args.batch_size, args.seq_len, args.steps, False, False, documents
        )
        label = f"{documents} documents a window (document_ids, {kernel})" if documents else "plain causal"
        print(f"  eager, {label}: {result}")
        sys.stdout.flush()

    for preset in args.presets:
        config = load_config(ROOT / preset)
        print(f"\n{preset}: micro-batch {args.batch_size} x {args.seq_len}, {'bf16' if bf16 else 'fp32'}")
        for compiled, checkpointing in settings(args.no_compile):
            result = measured(
                throughput, config, device, args.batch_size, args.seq_len, args.steps, compiled, checkpointing
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the previous model is gone; start the next from a clean pool
            label = f"{'compiled' if compiled else 'eager'}, grad checkpointing {'on' if checkpointing else 'off'}"
            print(f"  {label}: {result}")
            sys.stdout.flush()

    print(f"\ndocument masks, {args.presets[-1]}: micro-batch {args.batch_size} x {args.seq_len}")
    document_mask_check(first, device, args.batch_size, args.seq_len, args.steps, document_len=args.seq_len // 8)
    if args.seed_steps:
        print(
            f"\nthe seed's job as its config stands (train.compile: auto), {args.seed_config}, {args.seed_steps} steps:"
        )
        print(f"  {seed_job(args.seed_steps, args.seed_config)}")
    if args.markdown:
        print("```")


if __name__ == "__main__":
    main()
