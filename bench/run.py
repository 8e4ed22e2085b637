"""`make bench`: run every benchmark in bench/ and rewrite BENCHMARKS.md with their sections."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# decode_precision.py fetches SmolLM2-135M-Instruct once
BENCHMARKS = ["data_bench.py", "mixture_bench.py", "model_bench.py", "decode_precision.py", "sft_packing.py"]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    sections = []
    for name in BENCHMARKS:
        print(f"running bench/{name} ...", file=sys.stderr)
        out = subprocess.run([sys.executable, str(ROOT / "bench" / name)], capture_output=True, text=True, check=True)
        sections.append(out.stdout.strip())
    # bench/eval_bench.py takes minutes (the published model on CPU): its output is kept in a file.
    sections.append((ROOT / "bench" / "eval_results.md").read_text().strip())
    # GPU figures come from bench/gpu_check.sh on a lent card, recorded by hand in this file.
    sections.append((ROOT / "bench" / "gpu_results.md").read_text().strip())
    header = (
        "# Benchmarks\n\nWritten by `make bench` (`python bench/run.py`); do not edit by hand.\n\n"
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.\n"
    )
    (ROOT / "BENCHMARKS.md").write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print((ROOT / "BENCHMARKS.md").read_text())


if __name__ == "__main__":
    main()
