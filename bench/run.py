"""`make bench`: run the benchmarks, keep each one's section in bench/results/, rebuild BENCHMARKS.md.

Each benchmark is a script in bench/ that prints one Markdown section (its first line the `## title`).
Its output goes to bench/results/<name>.md under a line that says the exact command, the machine,
the date, the load and how long it took; BENCHMARKS.md is those files, in the order of BENCHMARKS.
A benchmark that cannot run here (CUDA ones on a CPU) or is not selected keeps its previous file,
so a CPU rerun never erases GPU figures. Adding a benchmark is one line in BENCHMARKS.

    python bench/run.py [--quick] [--only NAME ...]     # make bench
    python bench/run.py --only gpu                      # make bench-gpu, on a CUDA machine
    python bench/run.py --assemble                      # BENCHMARKS.md from the section files only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from report import machine

from smollm2.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Benchmark:
    name: str  # its section file: bench/results/<name>.md
    script: str  # in bench/
    full: tuple[str, ...]  # arguments of `make bench`
    quick: tuple[str, ...]  # arguments of `--quick`: fewer rounds, smaller inputs
    cuda: bool = False  # runs only where torch sees a CUDA device


BENCHMARKS = [
    Benchmark("data", "data_bench.py", ("--big_mb", "100", "--runs", "3"), ("--big_mb", "20", "--runs", "2")),
    Benchmark(
        "mixture",
        "mixture_bench.py",
        ("--big_mb", "200", "--runs", "3", "--steps", "10000", "--mask_steps", "20"),
        ("--big_mb", "20", "--runs", "2", "--steps", "10000", "--mask_steps", "8"),
    ),
    Benchmark("model", "model_bench.py", ("--runs", "3"), ("--runs", "2")),
    # decode_precision.py and eval_bench.py read the published model: scripts/fetch_instruct.py caches it once
    Benchmark("decode_precision", "decode_precision.py", ("--rounds", "3"), ("--rounds", "2")),
    Benchmark("decode", "decode_bench.py", ("--rounds", "5", "--startup"), ("--rounds", "2")),
    Benchmark(
        "muon_step",
        "muon_step.py",
        ("--batches", "4", "16", "64", "--steps", "15"),
        ("--batches", "16", "64", "--steps", "5"),
    ),
    Benchmark("time_to_quality_sweep", "time_to_quality.py", ("--sweep",), ("--sweep", "--steps", "100")),
    Benchmark("time_to_quality", "time_to_quality.py", ("--every", "50"), ("--quick",)),
    Benchmark("muon_135m", "muon_135m.py", ("--steps", "20", "--muon_lr", "4e-3"), ("--steps", "4")),
    Benchmark(
        "sft_packing",
        "sft_packing.py",
        ("--steps", "20", "--precision", "fp32", "bf16"),
        ("--steps", "6", "--precision", "fp32", "bf16"),
    ),
    Benchmark("eval", "eval_bench.py", ("--rounds", "3", "--bytes", "50000"), ("--rounds", "2", "--bytes", "20000")),
    Benchmark(
        "gpu",
        "gpu_check.py",
        ("--steps", "10", "--seed_steps", "500", "--markdown"),
        ("--steps", "3", "--markdown"),
        cuda=True,
    ),
]


def command(bench: Benchmark, quick: bool) -> list[str]:
    return ["python", f"bench/{bench.script}", *(bench.quick if quick else bench.full)]


def run_one(bench: Benchmark, quick: bool) -> str:
    """The script's section with the line that says how it was made; raises if the script failed."""
    argv = command(bench, quick)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # stderr passes through: a long benchmark's progress shows as it goes, and so does a failure's traceback
    out = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {out.returncode}): its error output is above")
    minutes, load_after = (time.perf_counter() - start) / 60, os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busy = " (more runnable processes than cores: other work shared the machine)"
    title, _, body = out.stdout.strip().partition("\n")
    made = (
        f"Command: `{' '.join(argv)}`{' (`make bench-quick`)' if quick else ''}. Machine: {machine()}, "
        f"{cores} cores. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Took {minutes:.1f} min; "
        f"load average (1 min) {load_before:.1f} at the start, {load_after:.1f} at the end"
        f"{busy if max(load_before, load_after) > cores else ''}."
    )
    return f"{title}\n\n{made}\n{body}\n"


def assemble() -> str:
    sections = []
    for bench in BENCHMARKS:
        path = RESULTS / f"{bench.name}.md"
        if path.is_file():
            sections.append(path.read_text().strip())
        else:
            sections.append(f"## {bench.name}\n\nNot measured yet: `python bench/run.py --only {bench.name}`.")
    header = (
        "# Benchmarks\n\nWritten by `make bench` (`python bench/run.py`) from the section files in bench/results/, "
        "each written by its script; do not edit by hand. Figures that vary are the median of the runs with "
        "(min-max) beside it. Each section says its command, machine, date, load and how long it took: sections "
        "can come from different runs and machines (the GPU one from `make bench-gpu`), and one that was not "
        "rerun says so.\n"
    )
    return header + "\n" + "\n\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller inputs")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS], help="these benchmarks")
    parser.add_argument("--assemble", action="store_true", help="only rebuild BENCHMARKS.md from bench/results/")
    args = parser.parse_args()
    import torch

    failed = []
    for bench in [] if args.assemble else BENCHMARKS:
        if args.only and bench.name not in args.only:
            continue
        if bench.cuda and not torch.cuda.is_available():
            print(f"bench/{bench.script}: no CUDA device here, bench/results/{bench.name}.md kept", file=sys.stderr)
            continue
        print(f"running {' '.join(command(bench, args.quick))} ...", file=sys.stderr, flush=True)
        try:
            write_atomic(RESULTS / f"{bench.name}.md", run_one(bench, args.quick))
        except RuntimeError as error:
            failed.append(bench.name)
            print(f"{error}\nbench/results/{bench.name}.md kept", file=sys.stderr)
    write_atomic(ROOT / "BENCHMARKS.md", assemble())
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (their previous sections kept)")


if __name__ == "__main__":
    main()
