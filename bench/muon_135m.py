"""Muon against AdamW at the 135M preset's shape: does Muon reach AdamW's step-N held-out loss by step 0.75 N?

config/smollm2-135m.yaml (30 x 576, vocab 49,152) trains from scratch on input.txt with the tokenizer
of the run, batch 4 x 256 (no accumulation, no activation checkpointing), the preset's WSD schedule
over N steps with a warmup of N/4, the same seed: AdamW at the preset's lr for N steps, then Muon
(--muon_lr for the hidden matrices, AdamW at the preset's lr for the rest) under the same N-step
schedule for 0.75 N steps, so its learning rates are AdamW's at every step it takes. Held-out loss:
the trainer's own validation (train.eval_batches batches of the run's val split) every N/4 steps.
Seconds per step: the training steps' own (metrics.jsonl), mean over the run.

    python bench/muon_135m.py [--steps 20] [--muon_lr 4e-3] [--eval_batches 4]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import machine  # noqa: E402  (bench/ is on sys.path: this script's folder)

from smollm2.config import load_config  # noqa: E402
from smollm2.trainer import train  # noqa: E402

SHAPE = ["data.path=input.txt", "data.seq_len=256", "train.batch_size=4", "train.grad_accum=1"]
QUIET = ["train.grad_checkpointing=false", "train.predict_every=100000", "train.wandb=false", "train.save_every=100000"]


def run(optimizer: list[str], steps: int, schedule: int, eval_batches: int, work: Path) -> tuple[dict, float]:
    """Train; {step: val_loss} and the mean seconds of a training step."""
    every = max(1, schedule // 4)
    overrides = [
        *SHAPE,
        *QUIET,
        *optimizer,
        f"train.schedule_steps={schedule}",
        f"train.warmup_steps={every}",
        f"train.eval_every={every}",
        f"train.eval_batches={eval_batches}",
    ]
    config = load_config(ROOT / "config/smollm2-135m.yaml", overrides)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train(config, steps, None, work)
    rows = [json.loads(line) for line in (work / "logs/metrics.jsonl").read_text().splitlines()]
    seconds = [r["tokens"] / r["step"] / r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
    losses = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    print(f"{optimizer}: val loss {losses}, {sum(seconds) / len(seconds):.2f} s a step", file=sys.stderr, flush=True)
    return losses, sum(seconds) / len(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="N: AdamW's steps and the schedule's length")
    parser.add_argument("--muon_lr", type=float, default=4e-3)
    parser.add_argument("--eval_batches", type=int, default=4)
    args = parser.parse_args()
    started = time.time()
    muon_steps = math.ceil(0.75 * args.steps)
    with tempfile.TemporaryDirectory() as scratch:
        adamw, adamw_step = run(
            ["train.optimizer=adamw"], args.steps, args.steps, args.eval_batches, Path(scratch) / "a"
        )
        muon_setting = ["train.optimizer=muon", f"train.muon_lr={args.muon_lr}"]
        muon, muon_step = run(muon_setting, muon_steps, args.steps, args.eval_batches, Path(scratch) / "m")
    target = adamw[args.steps]
    reached = next((step for step, loss in sorted(muon.items()) if loss <= target), None)
    lines = [
        f"## Muon at the 135M preset's shape (`python {' '.join(sys.argv)}`)",
        "",
        f"Machine: {machine()}. Took {(time.time() - started) / 60:.0f} min. config/smollm2-135m.yaml, input.txt, "
        f"batch 4 x 256, seed 1337, WSD over {args.steps} steps (warmup {max(1, args.steps // 4)}); Muon lr "
        f"{args.muon_lr:g} for the hidden matrices. Held-out loss: the trainer's validation, "
        f"{args.eval_batches} batches.",
        "",
        "| optimizer | " + " | ".join(f"val loss at step {s}" for s in sorted(adamw)) + " | seconds per step |",
        "|---|" + "---|" * len(adamw) + "---|",
        "| AdamW | " + " | ".join(f"{adamw[s]:.3f}" for s in sorted(adamw)) + f" | {adamw_step:.1f} |",
        "| Muon | "
        + " | ".join(f"{muon[s]:.3f}" if s in muon else "-" for s in sorted(adamw))
        + f" | {muon_step:.1f} |",
        "",
        f"AdamW's step-{args.steps} loss {target:.3f}: Muon "
        + (
            f"reaches it by step {reached} ({reached / args.steps:.2f} N; goal <= 0.75 N), in "
            f"{reached * muon_step / (args.steps * adamw_step):.2f}x AdamW's training time (goal <= 0.85x)."
            if reached
            else f"does not reach it by step {muon_steps} (0.75 N): the goal is not met."
        ),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
