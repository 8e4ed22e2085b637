"""What a user sees of a run: the console (progress bar, header, predictions, the closing lines),
logs/metrics.jsonl, logs/samples.md, logs/loss.png, and wandb.

`Reporter` owns all of it on rank 0; the other ranks get `Silent`, on which every report is a no-op,
so the trainer reports without asking which rank it is.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import matplotlib
from tqdm import tqdm

matplotlib.use("Agg")  # headless: the plot is a file, never a window
import matplotlib.pyplot as plt  # noqa: E402

from smollm2.errors import CONTENT_ERRORS, error_reason, read_utf8  # noqa: E402
from smollm2.files import open_append, open_regular, write_atomic  # noqa: E402
from smollm2.run_folder import RunFolder  # noqa: E402


class RunLog:
    """Append-only metrics and samples; a resumed run keeps the rows up to its checkpoint's step."""

    def __init__(self, out_dir: Path, start_step: int, config: dict, use_wandb: bool, project: str) -> None:
        run = RunFolder(out_dir)
        self.folder = run.logs
        self.start_step = start_step
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metrics_path, self.samples_path, self.plot_path = run.metrics, run.samples, run.plot
        # A resumed run goes on from its checkpoint's step: what was logged after it is cut back.
        rows = [r for r in read_metrics(self.metrics_path) if r["step"] <= start_step] if start_step else []
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        write_atomic(self.samples_path, samples_up_to(self.samples_path, start_step))
        self.summary_path = run.summary
        self.metrics_file = open_append(self.metrics_path)  # closed in close()
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
        with open_append(self.samples_path) as f:
            f.write("".join(lines))

    def plot(self) -> None:
        plot_losses(numeric_rows(read_metrics(self.metrics_path)), self.plot_path)

    def close(self) -> None:
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()


PROGRESS_SECONDS = 60.0  # without a terminal, a progress line at least this often
SPEED_AFTER_SECONDS = 30.0  # the speed line comes after 3 steps, or 2 when they took this long
SMOOTHING_STEPS = 20  # throughput and MFU over the last this many steps: one step's time swings


class Reporter:
    """Rank 0's view of a run: the progress bar and console lines, and the run's log files."""

    def __init__(self, log: RunLog, end: int, last_val_loss: float | None, speed: SpeedModel) -> None:
        self.log, self.end, self.speed = log, end, speed
        self.latest_val = last_val_loss
        self.began = self.last_line = time.perf_counter()
        self.first_step_done: float | None = None  # the first step warms up (allocations, cuDNN, compile)
        self.speed_said = False
        self.bar = tqdm(total=end, initial=log.start_step, desc="train", unit="step", disable=None, dynamic_ncols=True)

    def header(self, lines: list[str]) -> None:
        for line in lines:
            self.bar.write(line)

    def step(self, row: dict) -> None:
        """One optimizer step's row: to metrics.jsonl, wandb, the bar; the plot at evaluations."""
        self.speed.add(row)
        mfu = self.speed.mfu()
        if mfu is not None:
            row["mfu"] = mfu
        self.log.log(row)
        self.latest_val = row.get("val_loss", self.latest_val)
        fields = progress_fields(row, self.latest_val, self.speed.tokens_per_sec(), self.eta(row["step"]))
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(1)
        now = time.perf_counter()
        if self.first_step_done is None:
            self.first_step_done = now
        if "val_loss" in row:
            self.log.plot()
        done = row["step"] - self.log.start_step
        if not self.speed_said and (done >= 3 or (done == 2 and now - self.began >= SPEED_AFTER_SECONDS)):
            self.speed_said = True
            self.bar.write(self.speed_line(row["step"]))
        # No terminal (a pipe, a log file, a cluster job): a line per evaluation and per PROGRESS_SECONDS.
        if self.bar.disable and ("val_loss" in row or now - self.last_line >= PROGRESS_SECONDS):
            self.last_line = now
            print(f"step {row['step']}/{self.end} " + " ".join(f"{k} {v}" for k, v in fields.items()), flush=True)

    def seconds_per_step(self, step: int) -> float:
        """Measured over the steps after the first: the first one's warm-up (on a GPU, seconds of
        kernel tuning or compiling) would make every estimate of the rest too long."""
        done = step - self.log.start_step
        if done >= 2 and self.first_step_done is not None:
            return (time.perf_counter() - self.first_step_done) / (done - 1)
        return (time.perf_counter() - self.began) / max(1, done)

    def eta(self, step: int) -> str:
        return duration(self.seconds_per_step(step) * (self.end - step))

    def speed_line(self, step: int) -> str:
        per_step = self.seconds_per_step(step)
        tokens_per_sec = self.speed.tokens_per_step / per_step
        line = (
            f"speed: {per_step:.2f} s/step, {tokens_per_sec:,.0f} tokens/s on {self.speed.device}; "
            f"the {self.end - self.log.start_step} steps take ~{duration(per_step * (self.end - self.log.start_step))} "
            "at this speed"
        )
        if self.speed.device == "cpu" and per_step * (self.end - step) > 3600:
            line += " (config/tiny.yaml trains in minutes on a CPU)"
        return line

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

    def summary(self, summary: dict) -> None:
        """The run's closing figures: kept in logs/summary.json (for the Space and scripts)."""
        write_atomic(self.log.summary_path, json.dumps(summary, indent=2) + "\n")

    def say(self, text: str) -> None:
        print(text, flush=True)


class SpeedModel:
    """Throughput smoothed over the last steps, and MFU against a measured peak, or none when the
    peak cannot be trusted (a figure above 100% means the peak was measured too low)."""

    def __init__(self, device: str, tokens_per_step: int, flops_per_token: float, peak: float | None) -> None:
        self.device, self.tokens_per_step = device, tokens_per_step
        self.flops_per_token, self.peak = flops_per_token, peak
        self.seconds: list[float] = []  # of the last steps

    def add(self, row: dict) -> None:
        self.seconds = [*self.seconds[-(SMOOTHING_STEPS - 1) :], self.tokens_per_step / row["tokens_per_sec"]]

    def tokens_per_sec(self) -> float:
        return self.tokens_per_step * len(self.seconds) / max(1e-9, sum(self.seconds))

    def mfu(self) -> float | None:
        if not self.peak:
            return None
        mfu = self.flops_per_token * self.tokens_per_sec() / self.peak
        if mfu > 1.0:
            print(
                f"warning: MFU left out: training reached {mfu:.0%} of the peak measured at start-up "
                f"({self.peak / 1e9:.0f} GFLOP/s), so the machine was busy when it was measured",
                file=sys.stderr,
            )
            self.peak = None
            return None
        return mfu


class Silent:
    """What the ranks other than 0 report: nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def progress_fields(row: dict, val_loss: float | None, tokens_per_sec: float, eta: str) -> dict:
    fields = {"loss": f"{row['loss']:.3f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{tokens_per_sec:.0f}"}
    if "mfu" in row:
        fields["mfu"] = f"{100 * row['mfu']:.1f}%"
    if val_loss is not None:
        fields["val"] = f"{val_loss:.3f}"
    fields["eta"] = eta
    return fields


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except CONTENT_ERRORS:  # a line cut short by a crash, nested too deeply, a number too long: not a row
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):  # anything else is not a row of ours
            rows.append(row)
    return rows


def numeric_rows(rows: list[dict]) -> list[dict]:
    """The rows with their numbers only (and the step): what the plots and the Space's tables read.
    A value edited into something else ("loss": "abc") is left out rather than stopping them."""
    return [{key: value for key, value in row.items() if key == "step" or is_number(value)} for row in rows]


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SAMPLES_TITLE = "# Predictions during training\n"


def samples_up_to(path: Path, last_step: int) -> bytes:
    """samples.md without the sections of steps after `last_step` (all of them for a fresh run);
    the bytes kept as they are, whatever a user's editor put there."""
    if not last_step or not path.is_file():
        return SAMPLES_TITLE.encode()
    kept, keep = [], True
    with open_regular(path) as f:  # kept as bytes into the new samples.md: a link's target would reach the Space
        data = f.read()
    for line in data.splitlines(keepends=True):
        if match := re.match(rb"## step (\d+) \(", line):
            keep = _step_at_most(match[1].decode("ascii"), last_step)
        if keep:
            kept.append(line)
    return b"".join(kept).rstrip(b"\n") + b"\n"


MAX_STEP_DIGITS = 19  # a step number of samples.md: any int64, far past any run's steps


def _step_at_most(digits: str, last_step: int) -> bool:
    """Whether a section's step is at most `last_step`. A step of more digits than any step (a hand
    edit: 5,000 of them) is past it, and never converted: Python refuses to convert over 4,300 digits."""
    digits = digits.lstrip("0") or "0"
    return len(digits) <= MAX_STEP_DIGITS and int(digits) <= last_step


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
    section: Predictions | None = None  # None: before the first heading, or in a section not of ours
    block: list[str] | None = None
    for line in read_utf8(path).splitlines():
        if block is not None:
            if line == "```":
                section.texts.append("\n".join(block))
                block = None
            else:
                block.append(line)
        elif match := re.fullmatch(r"## step (\d+) \((.*)\)", line):
            # a step of more digits than any step (a hand edit) heads no section of ours, and is never converted
            section = Predictions(int(match[1]), match[2], []) if len(match[1]) <= MAX_STEP_DIGITS else None
            if section is not None:
                found.append(section)
        elif line == "```text" and section is not None:
            block = []
    return found


EVAL_PREFIX = "eval/"  # metrics.jsonl keys of benchmark figures (train.eval_tasks): eval/<task>/<metric>


def benchmark_points(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each "task/metric" of the train.eval_tasks evaluations, with its (step, value) points."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(EVAL_PREFIX):
                series.setdefault(key.removeprefix(EVAL_PREFIX), []).append((row["step"], value))
    return series


def plot_losses(rows: list[dict], path: Path) -> None:
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    benchmarks = benchmark_points(rows)
    if benchmarks:  # a second panel below the losses, on the same steps
        fig, (ax, bench_ax) = plt.subplots(2, 1, figsize=(8, 8), dpi=100, sharex=True)
        plot_benchmarks(bench_ax, benchmarks)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", marker="o", linewidth=2)
    for key in sorted({key for r in rows for key in r if key.startswith("val_loss/")}):  # a mixture's sources
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points, strict=True), label=f"val {key.removeprefix('val_loss/')}", marker=".", linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


WANDB_PROBE_SECONDS = 3.0


def wandb_unreachable() -> tuple[str, str | None]:
    """The wandb server (WANDB_BASE_URL, else wandb's cloud), and why a connection to it (or to the
    HTTPS proxy in the way) fails within a few seconds; None when it connects."""
    server = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    scheme = urlsplit(server).scheme
    proxy = os.environ.get(f"{scheme.upper()}_PROXY") or os.environ.get(f"{scheme}_proxy")
    target = urlsplit(proxy or server)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname or "", port), timeout=WANDB_PROBE_SECONDS).close()
    except (OSError, ValueError) as exc:
        return server, error_reason(exc, 80)
    return server, None


def plot_benchmarks(ax, benchmarks: dict[str, list[tuple[int, float]]]) -> None:
    for name, points in benchmarks.items():
        ax.plot(*zip(*points, strict=True), label=name, marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("benchmark (train.eval_limit examples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def start_wandb(folder: Path, config: dict, project: str):
    """wandb when it can run; offline (files under logs/wandb) without a key, or when its server cannot
    be reached (wandb itself would retry for its 90-second init_timeout before giving up); never
    required. A mode the user set (WANDB_MODE) is theirs: no check, no fallback."""
    try:
        import wandb
    except ImportError:
        print("warning: wandb is not installed; logging to logs/metrics.jsonl only", file=sys.stderr)
        return None
    mode = None  # wandb's choice: WANDB_MODE, else online
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        mode = "offline"
    elif "WANDB_MODE" not in os.environ:
        server, reason = wandb_unreachable()
        if reason:
            print(
                f"warning: wandb cannot reach {server} ({reason}); logging offline to {folder / 'wandb'} "
                "(upload it later with `wandb sync`)",
                file=sys.stderr,
            )
            mode = "offline"
    try:
        return wandb.init(project=project, dir=str(folder), config=config, reinit="finish_previous", mode=mode)
    except Exception as exc:  # wandb has many failure modes (network, auth); the run goes on without it
        print(f"warning: wandb could not start ({error_reason(exc, 100)}); continuing without it", file=sys.stderr)
        return None
