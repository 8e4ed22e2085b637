"""Time to quality: what held-out bits per byte each training recipe reaches per CPU-minute.

For each corpus (the shipped input.txt and arithmetic.jsonl, each with the project's own held-out
split) and each recipe (AdamW at tiny.yaml's lr, AdamW at a swept lr, Muon for the matrices with
AdamW for the rest), config/tiny.yaml trains from scratch under each seed, saving a checkpoint every
`--every` steps. Each checkpoint's bits per byte on the held-out text come from the `eval --text`
command's own work (smollm2.evaluation.evaluate, window 512, stride 256), on the held-out split
decoded back to text. Wall time is the training steps' own time (metrics.jsonl: tokens per step /
tokens per second), so checkpoints and evaluations do not count against a recipe.

Prints a Markdown section (for BENCHMARKS.md):
    python bench/time_to_quality.py           # 600 steps (make demo's length), seeds 1337 and 1338, lr sweep
    python bench/time_to_quality.py --quick   # 150 steps, no sweep (AdamW 3e-3, Muon 4e-3, as given)
    (--steps, --every, --corpora, --seeds, --budgets cut it down further on a busy machine)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from smollm2.config import load_config  # noqa: E402
from smollm2.evaluation import evaluate  # noqa: E402
from smollm2.trainer import train  # noqa: E402

CORPORA = {name: [f"data.path={name}"] for name in ("input.txt", "arithmetic.jsonl", "espanol.txt")}
# tiny.yaml's recipe before issue #25, spelled out so that it stays the reference whatever tiny.yaml says now
OLD_DEFAULT = [
    "train.optimizer=adamw",
    "train.lr=0.002",
    "train.min_lr=0.0002",
    "train.warmup_steps=50",
    "train.schedule=cosine",
    "train.batch_size=16",
    "data.seq_len=128",
]
QUIET = ["train.eval_every=100000", "train.predict_every=100000", "train.keep_last=1000"]


def recipes(adamw_lr: float, muon_lr: float) -> dict[str, list[str]]:
    return {
        "AdamW (tiny.yaml, lr 2e-3)": [],
        f"AdamW lr {adamw_lr:g}": [f"train.lr={adamw_lr}", f"train.min_lr={adamw_lr / 10}"],
        f"Muon lr {muon_lr:g} + AdamW 2e-3": ["train.optimizer=muon", f"train.muon_lr={muon_lr}"],
    }


def run(overrides: list[str], steps: int, every: int, work: Path) -> list[tuple[int, float, float]]:
    """Train; (step, seconds of training so far, held-out bits per byte) at every `every` steps."""
    config = load_config(ROOT / "config/tiny.yaml", [*overrides, *QUIET, f"train.save_every={every}"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(config, steps, None, work)
    rows = [json.loads(line) for line in (work / "logs/metrics.jsonl").read_text().splitlines()]
    seconds = np.cumsum([r["tokens"] / r["step"] / r["tokens_per_sec"] for r in rows])
    points = []
    for step in range(every, steps + 1, every):
        with contextlib.redirect_stdout(io.StringIO()):
            report = evaluate(str(work / f"checkpoints/step_{step}.pt"), split="val", precision="fp32")
        points.append((step, float(seconds[step - 1]), report["split"]["bits_per_byte"]))
    return points


def first_reaching(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    return next(((step, seconds) for step, seconds, bpb in points if bpb <= target), None)


def at_budget(points: list[tuple[int, float, float]], budget: float) -> float | None:
    """Bits per byte of the last checkpoint written within `budget` seconds of training."""
    within = [bpb for _, seconds, bpb in points if seconds <= budget]
    return within[-1] if within else None


def spread(values: list[float | None], digits: int = 3) -> str:
    if any(v is None for v in values):
        return (
            "not reached"
            if all(v is None for v in values)
            else f"{sum(v is not None for v in values)}/{len(values)} seeds"
        )
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def sweep(steps: int, every: int, work: Path) -> str:
    """Step-based: each learning rate's held-out bpb on input.txt, seed 1337, then two CPU recipes at Muon's best.

    Judged at equal training tokens (a recipe at batch 32 has its steps halved), so the bpb columns do
    not depend on the machine's load; seconds per step is the one timed column."""
    lines = [
        f"## Time to quality: learning-rate sweep (`python {' '.join(sys.argv)}`)",
        "",
        f"Machine: {machine()}. config/tiny.yaml on input.txt, seed 1337, {steps} steps of 16 x 128 tokens "
        "(or the same tokens in half the steps at batch 32). Held-out bits per byte: `smollm2 eval --split val` "
        "(the run's whole held-out split). Seconds per step: the training steps' own (metrics.jsonl), mean over "
        "the run, under whatever else ran on the machine.",
        "",
        "| recipe | "
        + " | ".join(f"bpb after {s * 16 * 128 // 1000}k tokens" for s in range(every, steps + 1, every))
        + " | seconds per step | seconds in all |",
        "|---|" + "---|" * (steps // every) + "---|---|",
    ]
    finals: dict[str, dict[float, float]] = {"adamw": {}, "muon": {}}
    for kind, lrs in SWEEP.items():
        for lr in lrs:
            name = f"AdamW lr {lr:g}" if kind == "adamw" else f"Muon lr {lr:g} (+ AdamW 2e-3)"
            points = run(sweep_setting(kind, lr), steps, every, work / f"sweep-{kind}-{lr}")
            finals[kind][lr] = points[-1][2]
            lines.append(sweep_row(name, points, points[-1][1] / steps))
    best = {kind: min(values, key=values.get) for kind, values in finals.items()}
    muon = sweep_setting("muon", best["muon"])
    candidates = {
        f"Muon lr {best['muon']:g}, batch 32, half the steps": (
            [*muon, "train.batch_size=32", f"train.warmup_steps={WARMUP // 2}"],
            2,
        ),
        f"Muon lr {best['muon']:g}, warmup 20, WSD schedule": (
            [*muon, "train.warmup_steps=20", "train.schedule=wsd"],
            1,
        ),
    }
    for name, (setting, fold) in candidates.items():
        points = run(setting, steps // fold, every // fold, work / f"sweep-{name[:20]}-{fold}")
        lines.append(sweep_row(name, points, points[-1][1] / (steps // fold)))
    lines += ["", f"Best: AdamW lr {best['adamw']:g}, Muon lr {best['muon']:g} (lowest bpb after {steps} steps)."]
    return "\n".join(lines)


SWEEP = {"muon": [4e-3, 8e-3, 2e-3], "adamw": [2e-3, 4e-3, 1e-3]}  # the likeliest first: a cut-short sweep still tells
WARMUP = 50  # tiny.yaml's warmup steps at batch 16 when the sweep was made


def sweep_setting(kind: str, lr: float) -> list[str]:
    """tiny.yaml's old recipe (AdamW 2e-3, cosine, warmup 50, batch 16) with one learning rate changed."""
    if kind == "muon":
        return [*OLD_DEFAULT, "train.optimizer=muon", f"train.muon_lr={lr}"]
    return [*OLD_DEFAULT, f"train.lr={lr}", f"train.min_lr={lr / 10}"]


def sweep_row(name: str, points: list[tuple[int, float, float]], per_step: float) -> str:
    print(f"{name} | (step, seconds, bpb): {points}", file=sys.stderr, flush=True)
    return (
        f"| {name} | " + " | ".join(f"{bpb:.3f}" for _, _, bpb in points) + f" | {per_step:.3f} | {points[-1][1]:.0f} |"
    )


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "CPU"
    )
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps, no lr sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    parser.add_argument("--steps", type=int, help="steps a run (default 600; --quick 150)")
    parser.add_argument("--every", type=int, help="steps between measured checkpoints (default 50; --quick 25)")
    parser.add_argument("--budgets", type=int, nargs="+", help="seconds of training to report bpb at")
    parser.add_argument("--corpora", nargs="+", choices=list(CORPORA), default=list(CORPORA))
    parser.add_argument("--sweep", action="store_true", help="only the learning-rate sweep (default 300 steps)")
    args = parser.parse_args()
    if args.sweep:
        with tempfile.TemporaryDirectory() as scratch:
            print(sweep(args.steps or 300, args.every or 50, Path(scratch)))
        return
    steps = args.steps or (150 if args.quick else 600)
    every = args.every or (25 if args.quick else 50)
    budgets = args.budgets or ([60, 120, 180] if args.quick else [60, 180, 600])
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        if args.quick:
            adamw_lr, muon_lr, notes = 3e-3, 4e-3, ["- no sweep (--quick): AdamW lr 3e-3, Muon lr 4e-3 as given"]
        else:
            adamw_lr, muon_lr, notes = sweep({"adamw": [1e-3, 2e-3, 4e-3], "muon": [2e-3, 4e-3, 8e-3]}, 300, work)
        table = {}
        for seed in args.seeds:  # every recipe under one seed before the next seed: a cut-short run still compares
            for corpus in args.corpora:
                for index, (name, overrides) in enumerate(recipes(adamw_lr, muon_lr).items()):
                    setting = [*CORPORA[corpus], *overrides, f"train.seed={seed}"]
                    points = run(setting, steps, every, work / f"{corpus}-{index}-{seed}")
                    print(f"{corpus} | {name} | seed {seed} | (step, seconds, bpb): {points}", file=sys.stderr)
                    table.setdefault((corpus, name), []).append(points)
    print(report(table, args, steps, budgets, notes, time.time() - started))


def report(table: dict, args, steps: int, budgets: list[int], notes: list[str], seconds: float) -> str:
    command = "python " + " ".join(sys.argv)
    lines = [
        f"## Time to quality (`{command}`)",
        "",
        f"Machine: {machine()}; 2 cores shared with other work. Date: {time.strftime('%Y-%m-%d')}. "
        f"Took {seconds / 60:.0f} min. config/tiny.yaml, {steps} steps, seeds {', '.join(map(str, args.seeds))} "
        "(mean ± half the range). Held-out bits per byte: `smollm2 eval --text` on the first 40 KB of the "
        "run's own held-out split; time: the training steps' own.",
        *notes,
        "",
    ]
    for corpus in args.corpora:
        names = [name for c, name in table if c == corpus]
        reference = table[corpus, names[0]]
        target = max(points[-1][2] for points in reference)  # every seed of the default reaches it
        lines += [
            f"**{corpus}**: target = {names[0]}'s final bpb (its worst seed's), {target:.3f}",
            "",
            "| recipe | final bpb | steps to target | seconds to target | time vs AdamW default | "
            + " | ".join(f"bpb at {b} s" for b in budgets)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(budgets),
        ]
        base_time = statistics.mean(first_reaching(points, target)[1] for points in reference)
        for name in names:
            runs = table[corpus, name]
            reached = [first_reaching(points, target) for points in runs]
            seconds = [r[1] if r else None for r in reached]
            ratio = f"{statistics.mean(seconds) / base_time:.2f}x" if None not in seconds else "n/a"
            lines.append(
                f"| {name} | {spread([p[-1][2] for p in runs])} | "
                f"{spread([r[0] if r else None for r in reached], 0)} | "
                f"{spread(seconds, 1)} | {ratio} | "
                + " | ".join(spread([at_budget(points, b) for points in runs]) for b in budgets)
                + " |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    main()
