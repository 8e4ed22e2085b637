"""The machine: CPU allocator tuning, bf16 support and autocast dtype, training FLOPs, peak FLOP/s."""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import torch

from smollm2.config import ModelConfig
from smollm2.model import parameter_count


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


def cpu_has_native_bf16() -> bool:
    """AMX-BF16 makes bf16 matmul fast on a CPU; without it bf16 is ~100x slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. auto: bf16 on CUDA that supports it, on CPU only with native bf16."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_native_bf16() else None


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
