"""Time to quality: what held-out bits per byte each training recipe reaches per CPU-minute.

For each corpus (the shipped input.txt, arithmetic.jsonl and espanol.txt, each with the run's own
held-out split) and each seed, config/tiny.yaml trains from scratch with each recipe: the old
default (AdamW lr 2e-3, cosine, warmup 50, batch 16 x 128, 600 steps: make demo's), and AdamW and
Muon (lr 4e-3 for the matrices) each with the sweep's best schedule (WSD, warmup 20), saving a
checkpoint every `--every` steps. Each checkpoint's bits per byte are `smollm2 eval --split val
--window 128 --stride 64`'s (the run's whole held-out split, in windows of the 128 tokens tiny
trains on). Time is steps x the run's median training step (metrics.jsonl: tokens per step /
tokens per second): checkpoints and evaluations do not count, and neither does a pause of the
process by other work on the machine, which a mean would take in.

Prints a Markdown section (for BENCHMARKS.md):
    python bench/time_to_quality.py --every 100   # seeds 1337 and 1338, every corpus
    python bench/time_to_quality.py --quick       # 150 steps, seed 1337, input.txt
    python bench/time_to_quality.py --sweep       # the learning-rate sweep alone (step-based), 300 steps
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import machine, spread  # noqa: E402  (bench/ is on sys.path: this script's folder)

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
# Scored at the length tiny trains on: its context is 512, but it never learned positions past 128, and
# windows of 512 measured that (a recipe that extrapolates better looked 2x further ahead than it is)
SCORING = {"window": 128, "stride": 64}
QUIET = ["train.eval_every=100000", "train.predict_every=100000", "train.keep_last=1000"]


# The sweep's best schedule for both optimizers (BENCHMARKS.md, the sweep section)
WSD = ["train.warmup_steps=20", "train.schedule=wsd"]


def recipes() -> dict[str, list[str]]:
    """The old default first (the reference), then each optimizer at the sweep's best lr and schedule."""
    return {
        "AdamW lr 0.002, cosine, warmup 50 (the old default)": OLD_DEFAULT,
        "AdamW lr 0.002, WSD, warmup 20": [*OLD_DEFAULT, *WSD],
        "Muon lr 0.004 + AdamW 0.002, WSD, warmup 20": [
            *OLD_DEFAULT,
            *WSD,
            "train.optimizer=muon",
            "train.muon_lr=0.004",
        ],
    }


def run(overrides: list[str], steps: int, every: int, work: Path) -> list[tuple[int, float, float]]:
    """Train; (step, seconds of training so far, held-out bits per byte) at every `every` steps.
    Seconds: steps x the run's median step (a pause of the process by other work does not count)."""
    config = load_config(ROOT / "config/tiny.yaml", [*overrides, *QUIET, f"train.save_every={every}"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(config, steps, None, work)
    rows = [json.loads(line) for line in (work / "logs/metrics.jsonl").read_text().splitlines()]
    per_step = [r["tokens"] / r["step"] / r["tokens_per_sec"] for r in rows]
    seconds = statistics.median(per_step) * np.arange(1, len(rows) + 1)
    points = []
    for step in range(every, steps + 1, every):
        with contextlib.redirect_stdout(io.StringIO()):
            report = evaluate(str(work / f"checkpoints/step_{step}.pt"), split="val", precision="fp32", **SCORING)
        points.append((step, float(seconds[step - 1]), report["split"]["bits_per_byte"]))
    return points


def first_reaching(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    return next(((step, seconds) for step, seconds, bpb in points if bpb <= target), None)


def at_budget(points: list[tuple[int, float, float]], budget: float) -> float | None:
    """Bits per byte of the last checkpoint written within `budget` seconds of training."""
    within = [bpb for _, seconds, bpb in points if seconds <= budget]
    return within[-1] if within else None


def seeds_spread(values: list[float | None], fmt: str = "{:.3f}") -> str:
    """report.spread over the seeds, or how many seeds got there when not all did."""
    if any(v is None for v in values):
        reached = sum(v is not None for v in values)
        return "not reached" if not reached else f"{reached}/{len(values)} seeds"
    return spread(values, fmt)


def sweep(steps: int, every: int, work: Path, lrs: dict[str, list[float]], candidates: bool) -> str:
    """Step-based: each learning rate's held-out bpb on input.txt, seed 1337, then CPU recipes at the best lrs.

    Judged at equal training tokens (a recipe at batch 32 has its steps halved), so the bpb columns do
    not depend on the machine's load; seconds per step is the one timed column."""
    lines = [
        f"## Time to quality: learning-rate sweep (`python {' '.join(sys.argv)}`)",
        "",
        f"Machine: {machine()}. config/tiny.yaml on input.txt, seed 1337, {steps} steps of 16 x 128 tokens "
        "(or the same tokens in half the steps at batch 32). Held-out bits per byte: `smollm2 eval --split val "
        "--window 128 --stride 64` (the run's whole held-out split, at the length it trains on). Seconds per "
        "step: the median of the run's training steps (metrics.jsonl), under whatever else ran on the machine.",
        "",
        "| recipe | "
        + " | ".join(f"bpb after {s * 16 * 128 // 1000}k tokens" for s in range(every, steps + 1, every))
        + " | seconds per step | seconds in all |",
        "|---|" + "---|" * (steps // every) + "---|---|",
    ]
    finals: dict[str, dict[float, float]] = {"adamw": {}, "muon": {}}
    for kind, values in lrs.items():
        for lr in values:
            name = f"AdamW lr {lr:g}" if kind == "adamw" else f"Muon lr {lr:g} (+ AdamW 2e-3)"
            points = run(sweep_setting(kind, lr), steps, every, work / f"sweep-{kind}-{lr}")
            finals[kind][lr] = points[-1][2]
            lines.append(sweep_row(name, points, points[-1][1] / steps))
    best = {kind: min(values, key=values.get) for kind, values in finals.items() if values}
    if not candidates or "muon" not in best:
        return "\n".join([*lines, "", "Best: " + ", ".join(f"{k} lr {v:g}" for k, v in best.items())])
    muon = sweep_setting("muon", best["muon"])
    recipes = {
        f"Muon lr {best['muon']:g}, batch 32, half the steps": (
            [*muon, "train.batch_size=32", f"train.warmup_steps={WARMUP // 2}"],
            2,
        ),
        f"Muon lr {best['muon']:g}, warmup 20, WSD schedule": (
            [*muon, *WSD],
            1,
        ),
    }
    if "adamw" in best:
        recipes[f"AdamW lr {best['adamw']:g}, warmup 20, WSD schedule"] = (
            [*sweep_setting("adamw", best["adamw"]), *WSD],
            1,
        )
    for name, (setting, fold) in recipes.items():
        points = run(setting, steps // fold, every // fold, work / f"sweep-{name[:20]}-{fold}")
        lines.append(sweep_row(name, points, points[-1][1] / (steps // fold)))
    lines += ["", "Best (lowest bpb after the last step): " + ", ".join(f"{k} lr {v:g}" for k, v in best.items())]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps, seed 1337, input.txt")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 1337 1338 (--quick: 1337)")
    parser.add_argument("--steps", type=int, help="steps a run (default 600; --quick 150; --sweep 300)")
    parser.add_argument("--every", type=int, help="steps between measured checkpoints (default 50; --quick 25)")
    parser.add_argument("--budgets", type=int, nargs="+", help="seconds of training to report bpb at")
    parser.add_argument("--corpora", nargs="+", choices=list(CORPORA), help="default: all (--quick: input.txt)")
    parser.add_argument("--sweep", action="store_true", help="only the learning-rate sweep, step-based")
    parser.add_argument("--muon_lrs", type=float, nargs="*", default=SWEEP["muon"], help="--sweep: Muon's lrs")
    parser.add_argument("--adamw_lrs", type=float, nargs="*", default=SWEEP["adamw"], help="--sweep: AdamW's lrs")
    parser.add_argument("--no_candidates", action="store_true", help="--sweep: not the recipes at the best lrs")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        if args.sweep:
            lrs = {"muon": args.muon_lrs, "adamw": args.adamw_lrs}
            print(sweep(args.steps or 300, args.every or 50, Path(scratch), lrs, not args.no_candidates))
            return
        steps = args.steps or (150 if args.quick else 600)
        every = args.every or (25 if args.quick else 50)
        seeds = args.seeds or ([1337] if args.quick else [1337, 1338])
        corpora = args.corpora or (["input.txt"] if args.quick else list(CORPORA))
        table = {}
        for seed in seeds:  # every recipe under one seed before the next seed: a cut-short run still compares
            for corpus in corpora:
                for index, (name, overrides) in enumerate(recipes().items()):
                    setting = [*CORPORA[corpus], *overrides, f"train.seed={seed}"]
                    points = run(setting, steps, every, Path(scratch) / f"{corpus}-{index}-{seed}")
                    print(f"{corpus} | {name} | seed {seed} | (step, seconds, bpb): {points}", file=sys.stderr)
                    table.setdefault((corpus, name), []).append(points)
    budgets = args.budgets or [60, 120, 180]
    print(report(table, corpora, seeds, steps, budgets, time.time() - started))


def report(table: dict, corpora: list[str], seeds: list[int], steps: int, budgets: list[int], seconds: float) -> str:
    lines = [
        f"## Time to quality (`python {' '.join(sys.argv)}`)",
        "",
        f"Machine: {machine()}. Took {seconds / 60:.0f} min. config/tiny.yaml, {steps} steps, seeds "
        f"{', '.join(map(str, seeds))} (median (min-max) over the seeds). Held-out bits per byte: "
        "`smollm2 eval --split val --window 128 --stride 64` (the run's whole held-out split, at the length it "
        "trains on). Time: steps x the run's median training step; a budget past a run's end shows its final bpb.",
        "",
    ]
    for corpus in corpora:
        names = [name for c, name in table if c == corpus]
        reference = table[corpus, names[0]]
        target = max(points[-1][2] for points in reference)  # every seed of the reference reaches it
        lines += [
            f"**{corpus}**: target = the old default's final bpb (its worst seed's), {target:.3f}",
            "",
            "| recipe | final bpb | steps to target | seconds to target | time vs old default | "
            + " | ".join(f"bpb at {b} s" for b in budgets)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(budgets),
        ]
        base_time = statistics.median(first_reaching(points, target)[1] for points in reference)
        for name in names:
            runs = table[corpus, name]
            reached = [first_reaching(points, target) for points in runs]
            times = [r[1] if r else None for r in reached]
            ratio = f"{statistics.median(times) / base_time:.2f}x" if None not in times else "n/a"
            lines.append(
                f"| {name} | {seeds_spread([p[-1][2] for p in runs])} | "
                f"{seeds_spread([r[0] if r else None for r in reached], '{:.0f}')} | "
                f"{seeds_spread(times, '{:.1f}')} | {ratio} | "
                + " | ".join(seeds_spread([at_budget(points, b) for points in runs]) for b in budgets)
                + " |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    main()
