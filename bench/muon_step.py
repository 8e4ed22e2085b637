"""Muon's cost per step against AdamW's on config/tiny.yaml, and Newton-Schulz's share of a step.

A step here is the trainer's own (forward, backward, `optimizer_step`) on random tokens; AdamW and
Muon steps alternate, so the machine's load falls on both alike; each figure is a median. Newton-
Schulz is timed alone on the momentum of every hidden matrix: it costs the same whatever the batch.
Prints a Markdown section (for BENCHMARKS.md):

    python bench/muon_step.py [--batches 4 16 64] [--steps 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smollm2.config import load_config  # noqa: E402
from smollm2.model import SmolLM2  # noqa: E402
from smollm2.muon import hidden_matrices, orthogonalized  # noqa: E402
from smollm2.trainer import make_optimizer, optimizer_step  # noqa: E402

CPU = torch.device("cpu")


def step_seconds(model: SmolLM2, optimizer, tokens: torch.Tensor) -> float:
    tick = time.perf_counter()
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    optimizer_step(model, optimizer, 1.0)
    return time.perf_counter() - tick


def newton_schulz_seconds(model: SmolLM2, repeats: int, dtype: torch.dtype) -> float:
    """Newton-Schulz on a random matrix of each hidden matrix's shape, as our Muon runs it in `dtype`
    (torch.optim.Muon's always runs in bf16)."""
    matrices = [torch.randn_like(p) for _, p in hidden_matrices(model)]
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        for matrix in matrices:
            orthogonalized(matrix, (3.4445, -4.775, 2.0315), 5, 1e-7, dtype)
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def measure(batch: int, steps: int) -> dict[str, float]:
    config = load_config(ROOT / "config/tiny.yaml")
    seq = config.data.seq_len
    models, optimizers = {}, {}
    for name in ("adamw", "muon"):
        torch.manual_seed(0)
        models[name] = SmolLM2(config.model)
        settings = load_config(ROOT / "config/tiny.yaml", [f"train.optimizer={name}"]).train
        optimizers[name] = make_optimizer(models[name], settings, CPU)
    times: dict[str, list[float]] = {"adamw": [], "muon": []}
    for step in range(steps + 2):
        tokens = torch.randint(0, config.model.vocab_size, (batch, seq + 1))
        for name in times:
            seconds = step_seconds(models[name], optimizers[name], tokens)
            if step >= 2:  # the first steps allocate the optimizers' state
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    config = load_config(ROOT / "config/tiny.yaml")
    model = SmolLM2(config.model)
    ns, ns_bf16 = (newton_schulz_seconds(model, args.steps, dtype) for dtype in (torch.float32, torch.bfloat16))
    names = (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    lines = [
        f"## Muon's step against AdamW's (`python bench/muon_step.py --batches {' '.join(map(str, args.batches))} "
        f"--steps {args.steps}`)",
        "",
        f"Machine: {next(names, 'CPU')}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python "
        f"{platform.python_version()}. Date: {time.strftime('%Y-%m-%d')}. config/tiny.yaml "
        f"(fp32, seq {config.data.seq_len}); medians of {args.steps} alternating steps. Newton-Schulz alone, on every "
        f"hidden matrix ({len(hidden_matrices(model))}): {ns * 1000:.1f} ms a step in fp32, as an fp32 run does it "
        f"({ns_bf16 * 1000:.1f} ms in bf16, as torch.optim.Muon and a bf16 run do).",
        "",
        "| batch (sequences) | AdamW step | Muon step | Muon / AdamW | Newton-Schulz's share of a Muon step |",
        "|---|---|---|---|---|",
    ]
    for batch in args.batches:
        median = measure(batch, args.steps)
        lines.append(
            f"| {batch} | {median['adamw'] * 1000:.0f} ms | {median['muon'] * 1000:.0f} ms | "
            f"{median['muon'] / median['adamw']:.2f}x | {ns / median['muon']:.0%} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
