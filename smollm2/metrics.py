"""What a user sees of a run: the console (progress bar, header, predictions, the closing lines),
logs/metrics.jsonl, logs/samples.md, logs/loss.png, and wandb.

`Reporter` owns all of it on rank 0; the other ranks get `Silent`, on which every report is a no-op,
so the trainer reports without asking which rank it is.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from tqdm import tqdm

matplotlib.use("Agg")  # headless: the plot is a file, never a window
import matplotlib.pyplot as plt  # noqa: E402

from smollm2.errors import error_reason  # noqa: E402
from smollm2.files import write_atomic  # noqa: E402


class RunLog:
    """Append-only metrics and samples; a resumed run keeps the rows up to its checkpoint's step."""

    def __init__(self, out_dir: Path, start_step: int, config: dict, use_wandb: bool, project: str) -> None:
        self.folder = Path(out_dir) / "logs"
        self.start_step = start_step
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.folder / "metrics.jsonl"
        self.samples_path = self.folder / "samples.md"
        self.plot_path = self.folder / "loss.png"
        rows = [r for r in read_metrics(self.metrics_path) if r["step"] <= start_step] if start_step else []
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        if not start_step:
            write_atomic(self.samples_path, "# Predictions during training\n")
        self.metrics_file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.wandb = start_wandb(self.folder, config, project) if use_wandb else None

    def log(self, row: dict) -> None:
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def samples(self, step: int, train_loss: float | None, val_loss: float | None, samples: list[tuple]) -> None:
        losses = ", ".join(
            f"{name} loss {value:.4f}"
            for name, value in (("train", train_loss), ("val", val_loss))
            if value is not None
        )
        lines = [f"\n## step {step} ({losses})\n"]
        for prompt, continuation in samples:
            lines.append(f"\n```text\n{prompt}{continuation}\n```\n")
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.write("".join(lines))

    def plot(self) -> None:
        plot_losses(read_metrics(self.metrics_path), self.plot_path)

    def close(self) -> None:
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


class Reporter:
    """Rank 0's view of a run: the progress bar and console lines, and the run's log files."""

    def __init__(
        self, log: RunLog, end: int, last_val_loss: float | None, flops_per_token: float, peak: float | None
    ) -> None:
        self.log, self.end = log, end
        self.latest_val = last_val_loss
        self.flops_per_token, self.peak = flops_per_token, peak  # peak None: no MFU (an unknown device)
        self.began = time.perf_counter()
        self.bar = tqdm(total=end, initial=log.start_step, desc="train", unit="step", disable=None, dynamic_ncols=True)

    def header(self, lines: list[str]) -> None:
        for line in lines:
            self.bar.write(line)

    def step(self, row: dict) -> None:
        """One optimizer step's row: to metrics.jsonl, wandb, the bar; the plot at evaluations."""
        if self.peak:
            row["mfu"] = self.flops_per_token * row["tokens_per_sec"] / self.peak
        self.log.log(row)
        self.latest_val = row.get("val_loss", self.latest_val)
        fields = progress_fields(row, self.latest_val)
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(1)
        if "val_loss" in row:
            self.log.plot()
            if self.bar.disable:  # no terminal (a pipe or a log file): one line per evaluation
                print(f"step {row['step']}/{self.end} " + " ".join(f"{k} {v}" for k, v in fields.items()), flush=True)

    def predictions(self, step: int, train_loss: float | None, val_loss: float | None, samples: list) -> None:
        self.log.samples(step, train_loss, val_loss, samples)
        text = "\n".join(f"  {prompt!r} -> {continuation!r}" for prompt, continuation in samples)
        self.bar.write(f"step {step} predictions:\n{text}")

    def warn(self, message: str) -> None:
        self.bar.write(f"warning: {message}", file=sys.stderr)

    def close(self) -> float:
        """Close the bar and the logs (plot redrawn); returns the run's seconds."""
        self.bar.close()
        self.log.plot()
        self.log.close()
        return time.perf_counter() - self.began

    def say(self, text: str) -> None:
        print(text, flush=True)


class Silent:
    """What the ranks other than 0 report: nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def progress_fields(row: dict, val_loss: float | None) -> dict:
    fields = {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_sec']:.0f}"}
    if "mfu" in row:
        fields["mfu"] = f"{100 * row['mfu']:.1f}%"
    if val_loss is not None:
        fields["val"] = f"{val_loss:.3f}"
    return fields


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: skip it
            continue
    return rows


@dataclass
class Predictions:
    step: int
    losses: str  # "train loss 4.8245, val loss 4.9085"
    texts: list[str]  # prompt + continuation, one per prompt


def read_samples(path: Path) -> list[Predictions]:
    """Parse logs/samples.md as RunLog.samples writes it."""
    if not path.is_file():
        return []
    found: list[Predictions] = []
    block: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if block is not None:
            if line == "```":
                found[-1].texts.append("\n".join(block))
                block = None
            else:
                block.append(line)
        elif match := re.fullmatch(r"## step (\d+) \((.*)\)", line):
            found.append(Predictions(int(match[1]), match[2], []))
        elif line == "```text" and found:
            block = []
    return found


def plot_losses(rows: list[dict], path: Path) -> None:
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", marker="o", linewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def start_wandb(folder: Path, config: dict, project: str):
    """wandb when it can run; offline (files under logs/wandb) without a key; never required."""
    try:
        import wandb
    except ImportError:
        print("warning: wandb is not installed; logging to logs/metrics.jsonl only", file=sys.stderr)
        return None
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    try:
        return wandb.init(project=project, dir=str(folder), config=config, reinit="finish_previous")
    except Exception as exc:  # wandb has many failure modes (network, auth); the run goes on without it
        print(f"warning: wandb could not start ({error_reason(exc, 100)}); continuing without it", file=sys.stderr)
        return None
