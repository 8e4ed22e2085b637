"""Atomic save and safe load of the full training state.

A checkpoint holds only tensors and plain Python types, so `torch.load(weights_only=True)` opens
it: loading a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from smollm2.config import ModelConfig, UserError, error_reason
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer

REQUIRED_KEYS = ("model", "optimizer", "step", "config", "tokenizer_hash", "loader")


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step}.pt"


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary name, fsync, rename: a crash leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable checkpoint, truncated or corrupt ({error_reason(exc, 100)})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        raise UserError(f"{path}: not a smollm2 training checkpoint (missing keys)")
    return state


def list_checkpoints(folder: Path) -> list[Path]:
    """The step_N.pt files in `folder`, oldest step first."""
    found = []
    for file in Path(folder).glob("step_*.pt"):
        match = re.fullmatch(r"step_(\d+)\.pt", file.name)
        if match:
            found.append((int(match.group(1)), file))
    return [file for _, file in sorted(found)]


def prune_checkpoints(folder: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step_N.pt files."""
    for file in list_checkpoints(folder)[:-keep_last]:
        file.unlink(missing_ok=True)


def capture_rng() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_plain(state: dict) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached"]


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_model_from_checkpoint(path: str | Path, device: str = "cpu") -> tuple[SmolLM2, Tokenizer]:
    """The model and tokenizer of a training checkpoint, for generate and export."""
    state = load_checkpoint(path)
    config = ModelConfig(**state["config"]["model"])
    model = SmolLM2(config)
    model.load_state_dict(state["model"])
    tokenizer = Tokenizer(HFTokenizer.from_str(state["tokenizer"])) if "tokenizer" in state else None
    return model.to(device), tokenizer
