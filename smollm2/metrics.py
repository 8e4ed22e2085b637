"""What a user sees of a run: logs/metrics.jsonl, logs/samples.md, logs/loss.png, and wandb."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the plot is a file, never a window
import matplotlib.pyplot as plt  # noqa: E402

from smollm2.config import error_reason  # noqa: E402


class RunLog:
    """Append-only metrics and samples; a resumed run keeps the rows up to its checkpoint's step."""

    def __init__(self, out_dir: Path, start_step: int, config: dict, use_wandb: bool, project: str) -> None:
        self.folder = Path(out_dir) / "logs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.folder / "metrics.jsonl"
        self.samples_path = self.folder / "samples.md"
        self.plot_path = self.folder / "loss.png"
        rows = [r for r in read_metrics(self.metrics_path) if r["step"] <= start_step] if start_step else []
        _write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        if not start_step:
            _write_atomic(self.samples_path, "# Predictions during training\n")
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
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
