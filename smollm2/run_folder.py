"""A run folder's layout, named once: where a run keeps its checkpoints, logs, final model and data.

RUN/
  .smollm2                 the marker: this folder holds one run (files.py)
  checkpoints/step_N.pt    the whole training state at step N (checkpoint.py)
  logs/metrics.jsonl, samples.md, loss.png, summary.json, wandb/   (metrics.py)
  final/                   the last model, a transformers folder (hf.py)
  data/NAME-VOCAB/         the prepared token files (data.py)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_NAME = re.compile(r"step_(\d+)\.pt")
PARTS = ("checkpoints", "logs", "final", "data")


def step_of(path: Path) -> int | None:
    """N for a file named step_N.pt; None for any other name."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(folder: Path) -> list[Path]:
    """The step_N.pt files in `folder`, oldest step first."""
    if not Path(folder).is_dir():
        return []
    found = [(step_of(file), file) for file in Path(folder).glob("step_*.pt")]
    return [file for step, file in sorted(found) if step is not None]


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def metrics(self) -> Path:
        return self.logs / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.logs / "samples.md"

    @property
    def plot(self) -> Path:
        return self.logs / "loss.png"

    @property
    def summary(self) -> Path:
        return self.logs / "summary.json"

    @property
    def wandb(self) -> Path:
        return self.logs / "wandb"

    @property
    def log_files(self) -> tuple[Path, ...]:
        """What a run writes in logs/."""
        return (self.metrics, self.samples, self.plot, self.summary, self.wandb)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}.pt"

    def list_checkpoints(self) -> list[Path]:
        return list_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> Path | None:
        existing = self.list_checkpoints()
        return existing[-1] if existing else None

    def looks_like_a_run(self) -> bool:
        """It holds a final/ model or checkpoints (what `--model RUN` and `export-space --run` need)."""
        return (
            (self.final / "config.json").is_file()
            or (self.final / "smollm2_config.json").is_file()
            or bool(self.list_checkpoints())
        )

    @classmethod
    def containing(cls, model: Path) -> RunFolder | None:
        """The run a model path belongs to: RUN/final, RUN/checkpoints/step_N.pt, or RUN itself."""
        model = Path(model)
        if model.is_file() and step_of(model) is not None and model.parent.name == "checkpoints":
            return cls(model.parent.parent)
        if model.is_dir() and model.name == "final":
            return cls(model.parent)
        if model.is_dir() and cls(model).looks_like_a_run():
            return cls(model)
        return None
