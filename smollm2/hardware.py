"""The machine: CPU allocator tuning, the precision of training and of decoding (measured), training FLOPs,
peak FLOP/s."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from smollm2.config import ModelConfig
from smollm2.errors import UserError, read_json_file
from smollm2.files import cache_root, write_atomic
from smollm2.model import KVCache, parameter_count


def keep_freed_memory_on_cpu() -> bool:
    """Stop glibc from handing large freed blocks back to the OS after every step.

    By default each activation and gradient over 32 MB is a fresh mmap, so every training step on a
    CPU pays ~300,000 page faults to get its memory back (about a sixth of a SmolLM2-135M step here;
    BENCHMARKS.md). Keeping freed memory in the heap is what jemalloc/tcmalloc do for PyTorch.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    largest_int = 2**31 - 1  # mallopt takes a C int: ctypes silently wraps anything larger (2**34 -> 0)
    return all(
        mallopt(option, value)
        for option, value in ((m_mmap_threshold, 1 << 30), (m_trim_threshold, largest_int), (m_top_pad, 1 << 28))
    )


BF16_MIN_SPEEDUP = 1.3  # bf16 autocast on a CPU only when its matmuls are clearly faster than fp32's


@dataclass(frozen=True)
class Precision:
    """The autocast dtype a run uses (None: plain fp32), and why, for the header line."""

    dtype: torch.dtype | None
    reason: str

    @property
    def name(self) -> str:
        return "bf16 autocast" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def key(self) -> str:
        """The train.precision value that trains this way: what a checkpoint keeps."""
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"


def choose_precision(
    precision: str,
    device: torch.device,
    config: ModelConfig,
    rows: int,
    agree=lambda speedup: speedup,
    kept: str | None = None,
) -> Precision:
    """fp32 and bf16 are the user's choice; auto is bf16 on CUDA that has it and, on a CPU, bf16
    when the model's own matmuls measure clearly faster in bf16 than in fp32. CPU features can't
    tell: AMX and AVX512-BF16 make bf16 2-4x faster, plain AVX2 makes it ~100x slower.
    `agree` makes every process of a run take the same decision from its own measurement.
    `kept`: the precision a resumed run's checkpoint trained in; auto keeps it, unmeasured, so that
    a resume never switches precision because this start measured otherwise."""
    if precision == "auto" and kept in ("fp32", "bf16"):
        return Precision(torch.bfloat16 if kept == "bf16" else None, "auto: kept from the checkpoint")
    if precision == "fp32":
        return Precision(None, "chosen")
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "chosen" if precision == "bf16" else "auto: CUDA with bf16")
        return Precision(None, "auto: this GPU has no bf16")
    speedup = agree(cpu_bf16_speedup(config, rows))  # under torchrun every rank takes rank 0's figure
    measured = f"bf16 matmul {speedup:.2g}x fp32 on this CPU"
    if precision == "bf16":
        if speedup < 1:
            print(f"warning: train.precision=bf16, but {measured}: training will be slower than fp32", file=sys.stderr)
        return Precision(torch.bfloat16, f"chosen; {measured}")
    if speedup >= BF16_MIN_SPEEDUP:
        return Precision(torch.bfloat16, f"auto: {measured}")
    return Precision(None, f"auto: {measured}")


DECODE_PROBE_STEPS = 8  # timed single-token steps per candidate, after the prompt built the kernels; the fastest counts
BF16_DECODE_MIN_SPEEDUP = 1.1  # bf16 weights only when whole decode steps are clearly faster than fp32's


@dataclass(frozen=True)
class DecodePrecision:
    """The weights decoding uses (fp32, bf16, or int8 with bf16 activations), whether oneDNN packs them,
    and why: what `--precision` resolved to, for a header line and the benchmarks."""

    key: str  # fp32 | bf16 | int8
    packed: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype the model's tensors are cast to (None: fp32, as loaded)."""
        return None if self.key == "fp32" else torch.bfloat16

    @property
    def name(self) -> str:
        return f"{self.key}{' packed' if self.packed and self.key != 'int8' else ''}"


def choose_decode_precision(
    precision: str, config: ModelConfig, device: torch.device, measured: dict[str, float] | None = None
) -> DecodePrecision:
    """The weights for decoding, and whether they are packed. fp32, bf16 and int8 are the user's choice
    of weights; auto is bf16 on CUDA and, on a CPU, whichever of the candidates decoded fastest in
    `measured` (candidate name -> seconds per whole decode step of this model on this machine,
    `decode_step_seconds`): bf16 only when it beats fp32 by BF16_DECODE_MIN_SPEEDUP (its greedy text
    parts from fp32's sooner or later), int8 never (it costs perplexity: a user's choice). Packed or
    plain is always the faster measured (fp32: MKL's plain matrix-vector product beat oneDNN's packed
    one on an Intel Xeon, lost on an AMD EPYC). Unmeasured (scoring, not decoding): packed on a CPU,
    and auto is fp32 there. Measured as a microbenchmark instead, one layer's matrix-vector products
    fit in cache and gave 1.27x to 1.85x from one run to the next: only whole steps are trusted."""
    packed = device.type == "cpu"
    if device.type == "cuda" and precision == "auto":
        return DecodePrecision("bf16", False, "auto: CUDA")
    if precision not in ("fp32", "bf16", "int8") and not measured:
        return DecodePrecision("fp32", packed, "auto: not measured (fp32)")
    if not measured or precision == "int8":
        return DecodePrecision(precision, packed, "chosen")
    rates = ", ".join(f"{name} {1 / seconds:.1f}" for name, seconds in measured.items())
    fastest: dict[str, tuple[float, str]] = {}
    for name, seconds in measured.items():
        key = name.split()[0]
        fastest[key] = min(fastest.get(key, (math.inf, name)), (seconds, name))
    if precision in fastest:  # the user's weights: only packed or not was measured
        name = fastest[precision][1]
        return DecodePrecision(precision, name.endswith("packed"), f"chosen; the faster here ({rates} steps/s)")
    _, name = fastest["fp32"]
    if "bf16" in fastest and fastest["fp32"][0] / fastest["bf16"][0] >= BF16_DECODE_MIN_SPEEDUP:
        _, name = fastest["bf16"]
    return DecodePrecision(name.split()[0], name.endswith("packed"), f"auto: fastest decoding here ({rates} steps/s)")


def cpu_name() -> str:
    """The CPU's model name (Linux), e.g. "Intel(R) Xeon(R) Processor"."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


DECODE_CHOICES_KIND = "smollm2 decode choices"  # the mark that the file is ours to rewrite


def decode_choices_path() -> Path:
    """Where measured decoding choices are remembered: $SMOLLM2_DECODE_CHOICES, else in smollm2's cache."""
    return Path(os.environ.get("SMOLLM2_DECODE_CHOICES", cache_root() / "decode_choices.json"))


def decode_choice_key(config: ModelConfig, precision: str) -> str:
    """What the fastest decoding depends on: the CPU, the threads, torch, and the model's shape."""
    shape = {name: getattr(config, name) for name in DECODE_SHAPE_FIELDS}
    return f"{precision} | {cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__} | {shape}"


DECODE_SHAPE_FIELDS = (
    "n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size",
    "norm", "mlp", "tie_embeddings", "attention",
)  # fmt: skip


def read_decode_choices(path: Path) -> dict | None:
    """The remembered choices: {} when there is no file yet, None when the file is not ours (left alone)."""
    try:
        data = read_json_file(path, "smollm2's decode choices")
    except FileNotFoundError:
        return {}
    except (OSError, UserError):  # not JSON, nested too deeply, not UTF-8: not ours
        return None
    ours = data.get("kind") == DECODE_CHOICES_KIND and isinstance(data.get("choices"), dict)
    return data["choices"] if ours else None


def remembered_decoding(config: ModelConfig, precision: str) -> DecodePrecision | None:
    """The choice measured on this machine for this shape before, or None: the measurement that picks the
    packed or plain path (and auto's weights) costs seconds, repaid only by long replies; once is enough."""
    path = decode_choices_path()
    entry = (read_decode_choices(path) or {}).get(decode_choice_key(config, precision))
    try:
        key, packed, reason, when = entry["key"], entry["packed"], entry["reason"], entry["measured"]
    except (TypeError, KeyError):
        return None
    if key not in ("fp32", "bf16") or not isinstance(packed, bool):
        return None
    return DecodePrecision(key, packed, f"{reason}; measured {when}, remembered in {path}")


def remember_decoding(config: ModelConfig, precision: str, chosen: DecodePrecision) -> None:
    """Keep a measured choice for the next start; a file that is not ours is never replaced, and a
    cache that can't be written is only not used."""
    path = decode_choices_path()
    choices = read_decode_choices(path)
    if choices is None:
        return
    choices[decode_choice_key(config, precision)] = {
        "key": chosen.key,
        "packed": chosen.packed,
        "reason": chosen.reason,
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"kind": DECODE_CHOICES_KIND, "choices": choices}, indent=1) + "\n")
    except OSError:
        pass


@torch.inference_mode()
def decode_step_seconds(models: dict[str, torch.nn.Module], steps: int = DECODE_PROBE_STEPS) -> dict[str, float]:
    """name -> the fastest of `steps` single-token decode steps (after a short prompt, with the KV
    cache), the candidates taking turns so that a busy moment of the machine hits them alike."""
    caches, seconds = {}, {name: float("inf") for name in models}
    prompt = torch.arange(8)[None]
    for name, model in models.items():
        weight = model.embed_tokens.weight
        caches[name] = KVCache(model.config, 1, prompt.shape[1] + steps + 1, weight.device, weight.dtype)
        model(prompt, cache=caches[name])  # the prompt, and oneDNN's kernels built
    token = prompt[:, -1:]
    for _ in range(steps):
        for name, model in models.items():
            start = time.perf_counter()
            model.decode_step(token, caches[name])  # what generation's inner loop calls
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return seconds


def cpu_bf16_speedup(config: ModelConfig, rows: int, repeats: int = 3) -> float:
    """fp32 time / bf16 time of the model's own matmul shapes (attention and MLP projections) on
    `rows` tokens; a second or two. A CPU without bf16 units is found after one bf16 round."""
    rows = max(1, min(rows, 1024))
    hidden, inner = config.hidden_size, config.intermediate_size
    shapes = [(rows, hidden, hidden), (rows, hidden, inner), (rows, inner, hidden)]
    local = torch.Generator().manual_seed(0)  # leaves the global RNG (checkpointed for exact resume) alone
    operands = [(torch.randn(m, k, generator=local), torch.randn(k, n, generator=local)) for m, k, n in shapes]

    def seconds(dtype: torch.dtype, rounds: int) -> float:
        pairs = [(a.to(dtype), b.to(dtype)) for a, b in operands]
        for a, b in pairs:  # warm up (oneDNN builds its kernels on first use)
            a[:8] @ b
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for a, b in pairs:
                a @ b
            best = min(best, time.perf_counter() - start)
        return best

    fp32 = seconds(torch.float32, repeats)
    bf16 = seconds(torch.bfloat16, 1)
    if bf16 < 2 * fp32:  # worth a closer look; a slow bf16 path is not timed again
        bf16 = min(bf16, seconds(torch.bfloat16, repeats))
    return fp32 / bf16


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention scores (PaLM appendix B)."""
    params = parameter_count(config)
    matmul_params = params if config.tie_embeddings else params - config.vocab_size * config.hidden_size
    return 6 * matmul_params + 12 * config.n_layers * config.hidden_size * seq_len


PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's peak for the precision in use: a table for GPUs, a measurement for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if tflops is None:
            return None
        return tflops * 1e12 if dtype == torch.bfloat16 else tflops * 1e12 / 2  # tf32 runs at half rate
    return measure_cpu_matmul_flops(dtype=dtype or torch.float32)


def measure_cpu_matmul_flops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The best of `repeats` size^3 matmuls in `dtype`: one busy moment cannot drag the best down,
    and a peak measured too low is what made MFU read above 100%."""
    local = torch.Generator().manual_seed(0)  # leaves the global RNG (checkpointed for exact resume) alone
    a = torch.randn(size, size, generator=local).to(dtype)
    b = torch.randn(size, size, generator=local).to(dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
