"""The training state and its file, defined once: what a checkpoint holds, how it is written
(atomically) and read back (safely), which runs may continue from it, and the run folder's
checkpoints/ and final/ (`Checkpointer`: when to save, what to keep, what never to touch).

A checkpoint holds only tensors and plain Python types, so `torch.load(weights_only=True)` opens
it: loading a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from smollm2 import distributed
from smollm2.config import COUNT_LIMIT, Config, ModelConfig, TrainConfig, model_config_from_dict
from smollm2.data import FORMAT_VERSION as DATA_FORMAT
from smollm2.errors import CONTENT_ERRORS, UserError, reading, refusal_while
from smollm2.files import (
    MARKER,
    RunLock,
    check_replaceable,
    clean_leftovers,
    inside_another,
    mark,
    read_marker,
    write_atomic,
)
from smollm2.hf import MODEL_FILES, check_tensor, load_weights, write_model_folder
from smollm2.model import SmolLM2
from smollm2.run_folder import RunFolder, list_checkpoints, step_of
from smollm2.tokenizer import Tokenizer

REQUIRED_KEYS = ("model", "optimizer", "step", "config", "tokenizer_hash", "loader", "rng")
# What a resumed run must share with its checkpoint for the data to come in the same order.
DATA_ORDER_KEYS = (
    ("data", "seq_len"),
    ("data", "val_fraction"),
    ("data", "tokenizer"),
    ("data", "text_field"),
    ("data", "format"),
    ("train", "seed"),
)


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class RunProgress:
    """Where a run stands: the loop advances it, the checkpoint keeps it."""

    step: int = 0
    tokens_seen: int = 0
    schedule_steps: int = 0
    last_loss: float | None = None
    last_val_loss: float | None = None
    run_id: str | None = field(default_factory=new_run_id)  # None: a checkpoint older than run ids
    precision: str | None = None  # fp32 or bf16, decided at the run's start and kept; None: an older checkpoint
    # the validation set's batch size (train.batch_size at the run's start), kept: val_loss stays on the same windows
    validation_batch_size: int | None = None


@dataclass
class Checkpoint:
    """Everything a run needs to go on exactly where it stopped."""

    progress: RunProgress
    model: dict[str, torch.Tensor]
    optimizer: dict
    loader: dict
    rng: dict
    config: dict
    tokenizer_hash: str
    tokenizer: str | None = None  # the tokenizer.json text (absent from the oldest checkpoints)
    chat_template: str | None = None  # the tokenizer's chat template (absent from older checkpoints)
    # what the run trains and validates on, by content (trainer.data_digest); absent from older checkpoints
    data_digest: str | None = None

    def to_dict(self) -> dict:
        """The file's layout: the progress fields at the top level, beside the states."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "progress"}
        return dataclasses.asdict(self.progress) | fields

    @classmethod
    def from_dict(cls, state: dict) -> Checkpoint:
        """A checkpoint's dictionary as `load_checkpoint` read and checked it."""
        defaults = {
            f.name: None if f.default is dataclasses.MISSING else f.default for f in dataclasses.fields(RunProgress)
        }
        progress = RunProgress(**{name: state.get(name, default) for name, default in defaults.items()})
        return cls(progress=progress, **{f.name: state.get(f.name) for f in dataclasses.fields(cls)[1:]})

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        return cls.from_dict(load_checkpoint(path))

    def save(self, path: Path) -> None:
        save_checkpoint(self.to_dict(), path)

    def weights_are_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.model.values() if t.is_floating_point())

    def check_resumable(self, config: Config) -> None:
        """Refuse, before the corpus is touched, a config this checkpoint cannot continue exactly."""
        saved, current = self.config, config.to_dict()
        for key, value in current["model"].items():
            if key == "attention":  # the kernel may change between machines; the weights do not
                continue
            if saved["model"].get(key) != value:
                raise UserError(
                    f"checkpoint has model.{key}={saved['model'].get(key)!r} but {config.source} says {value!r}: "
                    "it was trained with another architecture"
                )
        was_optimizer = saved.get("train", {}).get("optimizer", "adamw")  # older checkpoints: AdamW
        if was_optimizer != config.train.optimizer:
            raise UserError(
                f"checkpoint was trained with train.optimizer={was_optimizer} but {config.source} says "
                f"{config.train.optimizer}: its optimizer state is another optimizer's (to switch, start a new "
                "run from its weights with model.init_from)"
            )
        for section, key in DATA_ORDER_KEYS:
            was, now = saved.get(section, {}).get(key), current[section][key]
            if (section, key) == ("data", "tokenizer") and config.model.init_from:
                continue  # the checkpoint's own tokenizer (pretrained.resolve_init_from), checked by its hash
            if was is not None and was != now:
                raise UserError(
                    f"checkpoint was trained with {section}.{key}={was!r} but {config.source} says {now!r}: "
                    "a resumed run must see the same tokenizer and data in the same order"
                )
        was_format = self.loader.get("data_format", 1)
        if was_format != DATA_FORMAT:  # the token files and the loader's order changed with the format
            raise UserError(
                f"checkpoint was trained on data prepared and ordered by another smollm2 (data format {was_format}, "
                f"now {DATA_FORMAT}): it cannot go on with the same data; start a run from its weights with "
                "--set model.init_from=CHECKPOINT"
            )
        was_mask = saved.get("data", {}).get("document_mask", False)  # older checkpoints: no mask
        if was_mask != config.data.document_mask:
            raise UserError(
                f"checkpoint was trained with data.document_mask={was_mask!r} but {config.source} says "
                f"{config.data.document_mask!r}: a resumed run must see its windows as it was trained to "
                "(to change it, start a new run from this checkpoint's weights with model.init_from)"
            )
        was_sources = saved.get("data", {}).get("sources")
        if was_sources != config.data.sources:
            raise UserError(
                f"checkpoint was trained on data.sources={was_sources!r} but {config.source} says "
                f"{config.data.sources!r}: a resumed run must draw from the same sources with the same weights"
            )
        was_path = saved.get("data", {}).get("path")
        if config.data.sources is None and was_path is not None and was_path != config.data.path:
            if config.data.tokenizer == "train":
                raise UserError(
                    f"checkpoint was trained on data.path={was_path!r} but {config.source} says "
                    f"{config.data.path!r}: with data.tokenizer=train the tokenizer would be retrained on other text"
                )
            print(
                f"warning: data.path changed from {was_path!r} to {config.data.path!r}: "
                "the run goes on with the same tokenizer, on other data",
                file=sys.stderr,
            )

    def check_data(self, digest: str | None, config: Config) -> None:
        """A resume on other training data than its run's (a corpus edited in place, prepared again
        with the same data.tokenizer) goes on, as on a changed data.path, but says so in one line: its
        losses are no longer those of the run continued. A checkpoint older than data digests, or data
        without one (a datatrove folder), says nothing; a changed data.path was said already."""
        if self.data_digest is None or digest is None or digest == self.data_digest:
            return
        if config.data.path != self.config.get("data", {}).get("path", config.data.path):
            return
        what = "data.sources" if config.data.sources is not None else f"data.path {config.data.path!r}"
        print(
            f"warning: the training data is not the data this run trained on so far ({what} changed since "
            f"step {self.progress.step}): the run goes on with the same tokenizer, on other data, so it is not "
            "the run continued exactly",
            file=sys.stderr,
        )

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if self.tokenizer_hash != tokenizer.hash:
            raise UserError(
                f"checkpoint was trained with tokenizer {self.tokenizer_hash}, but the data uses "
                f"{tokenizer.hash}: use the same data.tokenizer and data.path as the first run"
            )


# What each field must be for a resume to rely on it: (test, what it should be).


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value, least: int = 0) -> bool:
    return _is_int(value) and least <= value < COUNT_LIMIT


def _is_number_or_none(value) -> bool:
    return value is None or isinstance(value, float) or (_is_int(value) and abs(value) < COUNT_LIMIT)


FIELD_CHECKS = {
    "step": (_is_count, "a whole number of steps, 0 or more (below 2**63)"),
    "tokens_seen": (_is_count, "a whole number of tokens, 0 or more (below 2**63)"),
    "schedule_steps": (lambda v: _is_count(v, 1), "a whole number of steps, 1 or more (below 2**63)"),
    "last_loss": (_is_number_or_none, "a number"),
    "last_val_loss": (_is_number_or_none, "a number"),
    "run_id": (lambda v: v is None or isinstance(v, str), "a string"),
    "precision": (lambda v: v in (None, "fp32", "bf16"), "fp32 or bf16"),
    "validation_batch_size": (lambda v: v is None or _is_count(v, 1), "a whole number of windows, 1 or more"),
    "tokenizer_hash": (lambda v: isinstance(v, str), "a string"),
    "tokenizer": (lambda v: v is None or isinstance(v, str), "a tokenizer.json text"),
    "chat_template": (lambda v: v is None or isinstance(v, str), "a string"),
    "data_digest": (lambda v: v is None or isinstance(v, str), "a string"),
    "model": (lambda v: isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()), "tensors"),
    "loader": (lambda v: isinstance(v, dict), "a loader position (step, batch_size, world_size)"),
}
# The loader's position (`data.Prefetcher.state_dict`); `windows`, `seed` and `data_format` are absent
# from older checkpoints.
LOADER_CHECKS = {
    "step": (True, lambda v: _is_count(v), "a whole number of micro-batches, 0 or more (below 2**63)"),
    "batch_size": (True, lambda v: _is_count(v, 1), "a whole number of windows, 1 or more (below 2**63)"),
    "world_size": (True, lambda v: _is_count(v, 1), "a whole number of processes, 1 or more (below 2**63)"),
    "windows": (False, lambda v: _is_count(v), "a whole number of windows, 0 or more (below 2**63)"),
    "seed": (False, lambda v: _is_count(v), "a whole number, 0 or more (below 2**63)"),
    "data_format": (False, lambda v: _is_count(v, 1), "a format version, 1 or more"),
}


def check_loader(loader: dict, source: str | Path) -> None:
    """Each field of the loader's position by its type and range, and the windows it stands for."""
    for key, (required, valid, expected) in LOADER_CHECKS.items():
        if (required or key in loader) and not valid(loader.get(key)):
            raise UserError(
                f"{source}: not a smollm2 training checkpoint (its loader is not a loader position: "
                f"loader.{key} must be {expected})"
            )
    if "windows" not in loader and not _is_count(loader["step"] * loader["batch_size"] * loader["world_size"]):
        raise UserError(
            f"{source}: not a smollm2 training checkpoint (its loader is not a loader position: "
            "loader.step x batch_size x world_size is past 2**63 windows)"
        )


def check_fields(state: dict, source: str | Path) -> None:
    """Every field a resume reads is of the type it is read as: one line naming the first that is not."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunProgress) if f.name != "run_id"}
    for key, (valid, expected) in FIELD_CHECKS.items():
        if key == "schedule_steps" and key not in state:
            continue  # older checkpoints: the schedule spans the resumed run's steps
        if not valid(state.get(key, defaults.get(key))):
            raise UserError(f"{source}: not a smollm2 training checkpoint (its {key} is not {expected})")
    check_loader(state["loader"], source)
    for name, tensor in state["model"].items():
        check_tensor(name, tensor, source)
    config = state["config"]
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{source}: not a smollm2 training checkpoint (no model config)")
    checkpoint_model_config(state, source)
    for section in ("data", "train"):
        if not isinstance(config.get(section, {}), dict):
            raise UserError(f"{source}: not a smollm2 training checkpoint (its config.{section} is not a mapping)")
    if not _is_optimizer_state(state["optimizer"]):
        raise UserError(f"{source}: not a smollm2 training checkpoint (its optimizer is not an optimizer state)")
    try:
        _check_rng(state["rng"])
    except (*CONTENT_ERRORS, RuntimeError):  # torch says RuntimeError of a generator state it cannot take
        raise UserError(f"{source}: not a smollm2 training checkpoint (its rng is not a saved RNG state)") from None


def _is_optimizer_state(optimizer) -> bool:
    """{"state": {index: {name: tensor}}, "param_groups": [{"params": [index, ...], ...}]}, as torch saves it."""
    if not isinstance(optimizer, dict):
        return False
    state, groups = optimizer.get("state"), optimizer.get("param_groups")
    return (
        isinstance(state, dict)
        and all(_is_int(k) and isinstance(v, dict) for k, v in state.items())
        and all(isinstance(t, torch.Tensor) for v in state.values() for t in v.values())
        and all(v["step"].numel() == 1 for v in state.values() if "step" in v)  # a step count
        and isinstance(groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
        and all(_is_int(i) for g in groups for i in g["params"])
    )


def check_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, source: str | Path) -> None:
    """A checkpoint's optimizer state fits the optimizer built for the model, before it is loaded: the
    same groups of the same sizes, and every moment the shape of its parameter. torch checks only the
    group sizes; a moment of another shape reached the fused AdamW kernel and corrupted the heap."""
    groups = optimizer.param_groups
    if [len(g["params"]) for g in saved["param_groups"]] != [len(g["params"]) for g in groups]:
        raise UserError(f"{source}: its optimizer state does not fit the model (other parameter groups)")
    for group, saved_group in zip(groups, saved["param_groups"], strict=True):
        for parameter, index in zip(group["params"], saved_group["params"], strict=True):
            for name, tensor in saved["state"].get(index, {}).items():
                if name != "step" and tensor.shape != parameter.shape:
                    raise UserError(
                        f"{source}: its optimizer state does not fit the model ({name} of parameter {index} has "
                        f"shape {list(tensor.shape)}, the parameter {list(parameter.shape)})"
                    )


def _check_rng(state: dict) -> None:
    """Restore the states into generators of their own: the process's own are left as they are."""
    random.Random().setstate(_as_tuples(state["python"]))
    np.random.RandomState().set_state(_numpy_state_from_plain(state["numpy"]))
    torch.Generator().set_state(state["torch"])
    if not isinstance(state.get("cuda", []), list):
        raise TypeError("cuda")


def save_checkpoint(state: dict, path: Path) -> None:
    """Write to a temporary name, fsync, rename: a crash leaves the old file or the new, never half.
    A full disk (or any refusal of the machine) is one line naming the checkpoint; the partial file goes."""
    try:
        write_atomic(path, lambda f: _torch_save(state, f))
    except OSError as exc:
        raise refusal_while(exc, f"saving checkpoint {path}") from None


class _RecordingWriter:
    """A file for torch.save that keeps the OSError a write raised: torch's zip writer turns it into
    a RuntimeError that no longer says why ("file write failed")."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def _torch_save(state: dict, file: BinaryIO) -> None:
    writer = _RecordingWriter(file)
    try:
        torch.save(state, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


def load_checkpoint(path: str | Path) -> dict:
    """The raw dictionary of a checkpoint file, or one line saying why it is not one."""
    path = Path(path)
    if path.is_dir():
        inside = RunFolder(path).checkpoints if RunFolder(path).checkpoints.is_dir() else path
        newest = list_checkpoints(inside)
        example = newest[-1] if newest else inside / "step_N.pt"
        raise UserError(f"{path} is a folder: pass a checkpoint file such as {example}")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # a whole file that names Python objects to build
            raise UserError(
                f"{path}: not a plain-tensor checkpoint (it holds Python objects, which smollm2 never loads)"
            ) from None
        raise UserError(f"{path}: not a readable checkpoint, truncated or corrupt") from None
    except Exception:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise UserError(f"{path}: not a readable checkpoint, truncated or corrupt") from None
    missing = [key for key in REQUIRED_KEYS if key not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
    if missing:
        raise UserError(f"{path}: not a smollm2 training checkpoint (no {', '.join(missing)})")
    with reading(path, "a smollm2 training checkpoint"):
        check_fields(state, path)
    return state


def peek_checkpoint(path: Path, key: str) -> object:
    """One field of a checkpoint file, read without loading its tensors into memory (mmap); None when
    the file has no such field or is not a readable checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many kinds for a file that is not a checkpoint
        return None
    return state.get(key) if isinstance(state, dict) else None


def checkpoint_run_id(path: Path) -> str | None:
    """The run id a checkpoint file holds; None when it has none or is not a readable checkpoint."""
    run_id = peek_checkpoint(path, "run_id")
    return run_id if isinstance(run_id, str) else None


def check_export_folder(out: Path, checkpoint: Path) -> None:
    """An export never goes into a part of a run, nor over the final model of another run (a
    model folder whose marker names a run id that is not the checkpoint's)."""
    where = inside_another(out)
    if where:
        raise UserError(f"--out {out} {where}: choose another folder")
    owner = read_marker(Path(out)).get("run_id")
    if owner and owner != checkpoint_run_id(Path(checkpoint)):
        raise UserError(f"--out {out} holds the final model of another run: choose another folder")


# ---------------------------------------------------------------------------------------------
# The run folder


class Checkpointer:
    """A run folder's checkpoints/ and final/: when to save, what to keep, what never to touch.

    A folder holds one run. A fresh run refuses a folder that holds another; a resumed run refuses
    one whose checkpoints are newer than its own or belong to another run, so nothing of a run is
    ever pruned or replaced by a different one.

    A checkpoint is good once a loss computed from its weights was finite: the next step's, or for
    the last checkpoint of a session, which no step follows, the validation loss at its step. Until
    then it is pending, and only a good checkpoint lets older ones go; pruning deletes only
    checkpoints that hold this run's id.
    """

    def __init__(self, out_dir: str | Path, train: TrainConfig, is_main: bool) -> None:
        self.out_dir = Path(out_dir)
        self.run = RunFolder(self.out_dir)
        self.folder, self.final = self.run.checkpoints, self.run.final
        self.save_every, self.keep_last = train.save_every, train.keep_last
        self.is_main = is_main
        self.run_id: str | None = None
        self.start = 0  # the step this session began at
        self.pending: Path | None = None  # written, not yet shown good
        self.good: Path | None = None  # the newest checkpoint shown good in this session

    def check_folder(self, resume: Checkpoint | None) -> None:
        """Refuse, before anything is written, a folder this run would damage. A folder another live
        run holds is refused as that: what its files look like mid-run (logs, no checkpoint yet) says
        nothing about a run that left them."""
        try:
            self._check_folder(resume)
        except UserError:
            if self.out_dir.is_dir():
                with RunLock(self.out_dir):  # raises, naming the other run, when one holds the folder
                    pass
            raise

    def _check_folder(self, resume: Checkpoint | None) -> None:
        for folder in (self.out_dir, self.folder):
            if folder.exists() and not folder.is_dir():
                raise UserError(f"{folder} is a file, not a folder: choose another --out_dir")
        self.check_not_inside_another_folder()
        existing = list_checkpoints(self.folder)
        logged = [p for p in self.run.log_files if p.exists()]
        if resume is None:
            held = existing[-1:] or [p for p in (self.final, *logged) if p.exists() and not _is_empty(p)]
            if held and existing:
                raise UserError(
                    f"{self.out_dir} already holds a run ({held[0]}): continue it with --checkpoint_path "
                    f"{existing[-1]}, or train into a new --out_dir"
                )
            if held:
                raise UserError(
                    f"{self.out_dir} already holds a run ({held[0]}) that left no checkpoint to continue: "
                    f"train into a new --out_dir, or move {held[0]} away"
                )
        else:
            newer = [p for p in existing if step_of(p) > resume.progress.step]
            if newer:
                raise UserError(
                    f"{self.folder} holds checkpoints past step {resume.progress.step} ({newer[-1].name}): resume "
                    f"from {newer[-1]}, or continue from step {resume.progress.step} into a new --out_dir"
                )
            owner = read_marker(self.out_dir).get("run_id")
            if owner and resume.progress.run_id and owner != resume.progress.run_id:
                raise UserError(f"{self.out_dir} holds another run: continue this one into a new --out_dir")
            self.check_same_run(resume.progress.run_id, existing)
            if logged and not owner and not existing:  # logs that no run of ours can be shown to have written
                raise UserError(
                    f"{self.out_dir} holds logs of an unknown run ({logged[0]}): continue into a new --out_dir"
                )
        check_replaceable(self.final, "model", "the run's final/", MODEL_FILES)

    def check_same_run(self, run_id: str | None, existing: list[Path]) -> None:
        """Checkpoints and final/ of another run (a copy of its folder has no marker) are refused."""
        strangers = [p for p in existing if checkpoint_run_id(p) != run_id]
        if strangers:
            raise UserError(
                f"{self.folder} holds checkpoints of another run ({strangers[-1].name}): "
                "continue this one into a new --out_dir"
            )
        final_run = read_marker(self.final).get("run_id")
        if final_run and final_run != run_id:
            raise UserError(f"{self.final} holds the model of another run: continue this one into a new --out_dir")

    def check_not_inside_another_folder(self) -> None:
        """A run folder is never a folder smollm2 wrote for something else, nor a part of a run."""
        kind = read_marker(self.out_dir).get("kind")
        if kind not in (None, "run"):
            raise UserError(f"{self.out_dir} is a {kind} folder smollm2 wrote: choose another --out_dir")
        where = inside_another(self.out_dir)
        if where:
            raise UserError(f"{self.out_dir} {where}: choose another --out_dir")

    def log_files(self) -> list[Path]:
        """What a run writes in logs/ that exists now."""
        return [p for p in self.run.log_files if p.exists() or p.is_symlink()]

    def remove_new_logs(self, existed: list[Path]) -> None:
        """A fresh run that stops before its first checkpoint leaves nothing to continue: the log
        files it created (they did not exist when it took the folder's lock) go with it, so that
        the same command can run again. A folder that holds a checkpoint keeps its logs."""
        if list_checkpoints(self.folder):
            return
        for path in self.log_files():
            if path in existed:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def mark_if_empty(self) -> bool:
        """Mark the run folder as a run's when it is empty (this run made it, or the user gave an
        empty one); a folder that already holds anything is never marked. True when marked."""
        self.out_dir.mkdir(parents=True, exist_ok=True)  # RunLock made it, where it can lock
        if any(self.out_dir.iterdir()):
            return False
        mark(self.out_dir, "run")
        return True

    def claim(self, run_id: str | None) -> None:
        """Name this run in the folder's marker (only a folder marked as a run's) and clear what
        killed runs left behind."""
        self.run_id = run_id
        if not self.is_main:
            return
        clean_leftovers(self.out_dir, {self.final.name, MARKER})  # the run folder may be the user's own
        clean_leftovers(self.folder, lambda name: step_of(name) is not None)  # only what a run writes there
        clean_leftovers(self.run.logs, {path.name for path in self.run.log_files})
        if run_id and read_marker(self.out_dir).get("kind") == "run":
            mark(self.out_dir, "run", run_id=run_id)

    def begin(self, step: int) -> None:
        """A session starts at `step`: the checkpoint it resumed from, when it lies here, is pending."""
        self.start = step
        path = self.run.checkpoint(step)
        self.pending = path if step and path.is_file() else None

    def due(self, step: int, end: int) -> bool:
        return step % self.save_every == 0 and step < end

    def save(self, checkpoint: Checkpoint) -> Path | None:
        """Write the checkpoint (rank 0), pending until shown good; None when its weights are not all
        finite: such weights are never written."""
        path = self.run.checkpoint(checkpoint.progress.step)
        written = checkpoint.weights_are_finite()
        if self.is_main and written:
            checkpoint.save(path)
        distributed.barrier()
        if written:
            self.pending = path
        return path if written else None

    def confirm(self) -> None:
        """A finite loss came from the pending checkpoint's weights: it is good, and older ones may go."""
        if self.pending is None:
            return
        self.good, self.pending = self.pending, None
        if self.is_main:
            self.prune(step_of(self.good))

    def prune(self, upto: int) -> None:
        """Delete all but the newest `keep_last` of this run's checkpoints up to step `upto`."""
        if self.run_id is None:  # a run older than run ids: nothing proves a checkpoint is its own
            return
        ours = [p for p in list_checkpoints(self.folder) if step_of(p) <= upto and checkpoint_run_id(p) == self.run_id]
        for file in ours[: -self.keep_last]:
            file.unlink(missing_ok=True)

    def last_good(self) -> Path | None:
        """The newest checkpoint shown good in this session, else the newest from before it."""
        if self.good is not None:
            return self.good
        before = [p for p in list_checkpoints(self.folder) if step_of(p) <= self.start]
        return before[-1] if before else None

    def export_final(self, model: SmolLM2, tokenizer: Tokenizer) -> tuple[Path, str]:
        """final/: built beside the old one and swapped in, so an old final/ survives until the new is whole."""
        return self.final, write_model_folder(model, self.final, tokenizer, run_id=self.run_id)


def _is_empty(path: Path) -> bool:
    return not any(path.iterdir()) if path.is_dir() else path.stat().st_size == 0


# ---------------------------------------------------------------------------------------------
# Random number generators


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
    model = SmolLM2.with_weights(
        checkpoint_model_config(state, path), lambda model: load_weights(model, state["model"], path)
    )
    return model.to(device), state_tokenizer(state, path)


def state_tokenizer(state: dict, path: str | Path) -> Tokenizer | None:
    """The tokenizer a checkpoint holds, with its chat template; None in the oldest checkpoints."""
    if "tokenizer" not in state:
        return None
    try:
        backend = HFTokenizer.from_str(state["tokenizer"])
    except Exception:  # tokenizers raises a bare Exception for malformed text
        raise UserError(f"{path}: the checkpoint's tokenizer is not a valid tokenizer.json") from None
    return Tokenizer(backend, chat_template=state.get("chat_template"))


def checkpoint_tokenizer(path: str | Path) -> Tokenizer:
    """A checkpoint's tokenizer, for data.tokenizer (and model.init_from) naming a .pt file."""
    tokenizer = state_tokenizer(load_checkpoint(path), path)
    if tokenizer is None:
        raise UserError(f"{path}: the checkpoint holds no tokenizer (it is older than tokenizers in checkpoints)")
    return tokenizer


def checkpoint_model_config(state: dict, path: str | Path) -> ModelConfig:
    """The architecture a checkpoint was trained with, checked like any config."""
    config = state["config"]
    return model_config_from_dict(config.get("model") if isinstance(config, dict) else None, str(path))
