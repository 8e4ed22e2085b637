"""What model is at a path: the one place every command, the Space and model.init_from ask.

A path names a model in one of four ways:
- a training checkpoint, `RUN/checkpoints/step_N.pt` (or any `.pt` file we wrote);
- a model folder: a run's `final/`, an `export --out`, a downloaded SmolLM2 (transformers Llama);
- a run folder: its `final/` when the run finished, else its latest checkpoint.
`ModelSource.open` decides which, once; its architecture, tokenizer and weights are read from there.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from smollm2.checkpoint import (
    checkpoint_model_config,
    checkpoint_tokenizer,
    load_checkpoint,
    load_weights,
    state_tokenizer,
)
from smollm2.config import ModelConfig
from smollm2.errors import UserError
from smollm2.hf import load_model, read_model_config
from smollm2.model import SmolLM2
from smollm2.run_folder import RunFolder
from smollm2.tokenizer import Tokenizer, check_vocab_size, load_tokenizer

MODEL_CONFIG_FILES = ("config.json", "smollm2_config.json")


def open_tokenizer(spec: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """data.tokenizer (or model.init_from) as a tokenizer: tokenizer.json, a folder holding one, or the
    tokenizer a training checkpoint (.pt) carries; refused when it has more tokens than vocab_size."""
    path = Path(spec)
    if path.suffix == ".pt" and path.is_file():
        return check_vocab_size(checkpoint_tokenizer(path), path, vocab_size)
    return load_tokenizer(path, vocab_size)


def is_model_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_CONFIG_FILES)


class ModelSource:
    """A checkpoint file or a model folder, and the run it belongs to (None when it belongs to none)."""

    def __init__(self, path: Path, is_checkpoint: bool) -> None:
        self.path = path
        self.is_checkpoint = is_checkpoint
        self.run = RunFolder.containing(path)

    @classmethod
    def open(cls, spec: str | Path, what: str = "model") -> ModelSource:
        """The model `spec` names, or one line saying why it names none. `what` names the flag or key."""
        path = Path(spec).expanduser()
        if path.is_file():
            return cls(path, is_checkpoint=True)
        if not path.is_dir():
            raise UserError(f"{what} {spec}: no such checkpoint file or model folder")
        if is_model_folder(path):
            return cls(path, is_checkpoint=False)
        run = RunFolder(path)
        if is_model_folder(run.final):
            return cls(run.final, is_checkpoint=False)
        latest = run.latest_checkpoint()
        if latest is not None:
            return cls(latest, is_checkpoint=True)
        raise UserError(f"{what} {spec}: no config.json, final/ or checkpoints/step_N.pt (not a model or a run)")

    @classmethod
    def checkpoint_file(cls, spec: str | Path) -> ModelSource:
        """A training checkpoint, as `--checkpoint` names one: a folder is refused, naming its newest
        checkpoint (reading it says so)."""
        source = cls(Path(spec).expanduser(), is_checkpoint=True)
        source.state  # noqa: B018 - read now: a folder, a missing or a damaged file is one line here
        return source

    @cached_property
    def state(self) -> dict:
        """The checkpoint's whole state (read once)."""
        return load_checkpoint(self.path)

    def config(self) -> ModelConfig:
        if self.is_checkpoint:
            return checkpoint_model_config(self.state, self.path)
        return read_model_config(self.path)

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer saved with the model (None when there is none). The one place a model's
        tokenizer is compared with its vocab_size: one with ids past the embedding's rows is refused."""
        if self.is_checkpoint:
            tokenizer = state_tokenizer(self.state, self.path)
        else:
            tokenizer = load_tokenizer(self.path) if (self.path / "tokenizer.json").is_file() else None
        return None if tokenizer is None else check_vocab_size(tokenizer, self.path, self.config().vocab_size)

    def require_tokenizer(self) -> Tokenizer:
        tokenizer = self.tokenizer()
        if tokenizer is None:
            raise UserError(f"{self.path}: no tokenizer found beside the model")
        return tokenizer

    def load(self, device: str | torch.device = "cpu") -> tuple[SmolLM2, Tokenizer | None]:
        """The model (on `device`, fp32) and its tokenizer."""
        if self.is_checkpoint:
            model = SmolLM2.with_weights(
                self.config(), lambda model: load_weights(model, self.state["model"], self.path)
            )
        else:
            model = load_model(self.path)
        return model.to(device), self.tokenizer()

    def weights(self) -> dict[str, torch.Tensor]:
        return self.load()[0].state_dict()
