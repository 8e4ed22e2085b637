"""Weighted mixtures of sources: `data.sources` -> one token stream per source -> training windows
drawn from the sources in proportion to their weights.

Each text source is prepared on its own by `data.prepare` (its own folder under data/, reused
while unchanged, as a single corpus is); a folder of datatrove-tokenized files is read where it
lies (`smollm2.datatrove_io`). `MixtureLoader` draws the windows in an order that is a pure
function of (seed, step, rank, world): global window g falls in block g // BLOCK, every block
holds each source's share of its BLOCK windows (largest remainder) in an order drawn from
(seed, block), and the k-th window drawn from a source is window k mod n of that source's own
permutation for epoch k // n. So the loader's state is one integer, ranks never share a window,
and a source that runs out starts its next epoch (said in the log) while the others go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from smollm2.config import Config, Source
from smollm2.data import (
    Batch,
    BatchLoader,
    Prefetcher,
    PreparedData,
    eval_batches,
    prepare,
    resolve_sources,
    say_without_validation,
    windows_batch,
)
from smollm2.datatrove_io import check_datatrove_folder, is_datatrove_folder, read_datatrove_folder
from smollm2.errors import UserError
from smollm2.model_source import open_tokenizer
from smollm2.run_folder import RunFolder
from smollm2.tokenizer import Tokenizer

BLOCK = 10_000  # windows per block: each source's share is exact to 1 / BLOCK within every block


@dataclass
class SourceData:
    source: Source
    train: list[np.ndarray]  # token arrays; a window never spans two of them
    val: np.ndarray
    folder: Path  # where its tokens lie


@dataclass
class MixtureData:
    tokenizer: Tokenizer
    sources: list[SourceData]


# ---------------------------------------------------------------------------------------------
# Preparing every source


AcceptTokenizer = Callable[[Tokenizer], None] | None  # called once the tokenizer is known, before any write


def prepare_corpus(
    config: Config,
    out_dir: str | Path = ".",
    quiet: bool = False,
    workers: int = 1,
    accept_tokenizer: AcceptTokenizer = None,
) -> PreparedData:
    """One corpus, data.path: `data.prepare` with the tokenizer data.tokenizer names."""
    tokenizer = given_tokenizer(config)
    return prepare(config, out_dir, quiet, workers=workers, tokenizer=tokenizer, accept_tokenizer=accept_tokenizer)


def prepare_mixture(
    config: Config,
    out_dir: str | Path = ".",
    quiet: bool = False,
    workers: int = 1,
    accept_tokenizer: AcceptTokenizer = None,
) -> MixtureData:
    """Text sources first (with data.tokenizer=train the first one trains the tokenizer and the
    others are tokenized with it), then datatrove folders, checked against that tokenizer.
    `accept_tokenizer` sees the tokenizer before any source's files are written."""
    sources = config.data.mixture(config.source)
    base = Path(config.data.prepared_dir) if config.data.prepared_dir else RunFolder(out_dir).data
    spec = config.data.tokenizer
    prepared: dict[str, SourceData] = {}
    folders = {s.name: is_datatrove_folder(Path(s.path)) for s in sources}
    for index, source in enumerate(sources):  # a missing source fails before any is prepared
        if folders[source.name]:
            with _about(index, source):
                check_datatrove_folder(Path(source.path))
        else:
            with _about(index, source):
                if sum(f.stat().st_size for f in resolve_sources(source.path)) == 0:
                    raise UserError(f"the corpus {source.path!r} is empty")
    tokenizer = given_tokenizer(config)
    if tokenizer is not None and accept_tokenizer is not None:
        accept_tokenizer(tokenizer)
    for index, source in enumerate(sources):
        if folders[source.name]:
            continue
        folder = base / f"{source.name}-{config.model.vocab_size}"
        with _about(index, source):
            config_of_source = _source_config(config, source, spec, folder)
            accept = _said_as_it_is(accept_tokenizer) if tokenizer is None else None  # the first text source trains it
            data = prepare(config_of_source, out_dir, quiet, workers, tokenizer, accept)
        prepared[source.name] = SourceData(source, [data.train], data.val, data.folder)
        if tokenizer is None:  # trained on the first text source, it serves the others
            tokenizer = data.tokenizer
            spec = str(data.folder / "tokenizer.json")
    if tokenizer is None:
        raise UserError(
            "data.tokenizer=train needs a text source to train on, and every source is a datatrove folder: "
            "set data.tokenizer to the tokenizer.json they were tokenized with"
        )
    for index, source in enumerate(sources):
        if folders[source.name]:
            with _about(index, source):
                train, val = read_datatrove_folder(
                    Path(source.path), tokenizer, config.data.tokenizer, config.data.val_fraction
                )
            prepared[source.name] = SourceData(source, train, val, Path(source.path))
    return MixtureData(tokenizer=tokenizer, sources=[prepared[s.name] for s in sources])


def given_tokenizer(config: Config) -> Tokenizer | None:
    """data.tokenizer read once for the whole pipeline: a file, a folder or a checkpoint's (None: train one)."""
    if config.data.tokenizer == "train":
        return None
    return open_tokenizer(config.data.tokenizer, config.model.vocab_size)


def _source_config(config: Config, source: Source, tokenizer: str, folder: Path) -> Config:
    data = dataclasses.replace(
        config.data,
        path=source.path,
        text_field=source.text_field,
        tokenizer=tokenizer,
        prepared_dir=str(folder),
        sources=None,
    )
    return dataclasses.replace(config, data=data)


class _NotAboutTheSource(Exception):
    """accept_tokenizer's refusal (a prompt, a resumed run's tokenizer), raised while a source is
    prepared but not about it: `_about` lets it out as it was raised."""

    def __init__(self, error: UserError) -> None:
        super().__init__(str(error))
        self.error = error


def _said_as_it_is(accept_tokenizer: AcceptTokenizer) -> AcceptTokenizer:
    if accept_tokenizer is None:
        return None

    def accept(tokenizer: Tokenizer) -> None:
        try:
            accept_tokenizer(tokenizer)
        except UserError as error:
            raise _NotAboutTheSource(error) from None

    return accept


@contextlib.contextmanager
def _about(index: int, source: Source) -> Iterator[None]:
    """Errors while preparing a source are said of it: one about data.path (the source's path, as data.py
    sees it) by its reason, any other whole."""
    try:
        yield
    except _NotAboutTheSource as refusal:
        raise refusal.error from None
    except UserError as error:
        reason = error.reason if error.key == "data.path" else str(error)
        raise type(error)(reason, key=f"data.sources[{index}] ({source.name})") from None


def validation_sets(data: PreparedData | MixtureData) -> dict[str, tuple[np.ndarray, float]]:
    """name -> (validation tokens, weight): one unnamed set for a single corpus, one per source, each
    weighted by its share of the weights (they sum to 1: weights of 1e307 each would make a weighted
    loss overflow to inf)."""
    if isinstance(data, MixtureData):
        total = sum(s.source.weight for s in data.sources)
        return {s.source.name: (s.val, s.source.weight / total) for s in data.sources}
    return {"": (data.val, 1.0)}


def validation_batches(
    data: PreparedData | MixtureData, config: Config, batch_size: int | None = None
) -> dict[str, tuple[list[Batch], float]]:
    """name -> (the fixed validation batches, weight) of each validation set: train.eval_batches
    batches of `batch_size` windows (the run's validation batch size; None: train.batch_size). One
    line is said for empty ones."""
    settings = config.train
    batch_size = batch_size or settings.batch_size
    eos_id = data.tokenizer.eos_id if config.data.document_mask else None
    sets = {
        name: (eval_batches(val, batch_size, config.data.seq_len, settings.eval_batches, eos_id), weight)
        for name, (val, weight) in validation_sets(data).items()
    }
    empty = [name for name, (batches, _) in sets.items() if not batches]
    fraction = config.data.val_fraction
    if fraction == 0:
        say_without_validation(empty, "data.val_fraction is 0")
    else:
        held = sum(len(val) for name, (val, _) in validation_sets(data).items() if name in empty)
        say_without_validation(
            empty,
            f"data.val_fraction={fraction} held out {held} token(s), too few for a window of 2 "
            "(more text or a larger data.val_fraction gives one)",
        )
    return sets


def corpus_loader(data: PreparedData, config: Config, rank: int, world_size: int, device) -> BatchLoader:
    """One corpus's loader (data.path)."""
    return BatchLoader(data.train, *_loader_args(data, config, rank, world_size, device))


def mixture_loader(data: MixtureData, config: Config, rank: int, world_size: int, device) -> MixtureLoader:
    """A mixture's loader (data.sources)."""
    return MixtureLoader(data, *_loader_args(data, config, rank, world_size, device))


def _loader_args(data: PreparedData | MixtureData, config: Config, rank: int, world_size: int, device) -> tuple:
    settings = config.train
    eos_id = data.tokenizer.eos_id if config.data.document_mask else None
    return (settings.batch_size, config.data.seq_len, settings.seed, rank, world_size, device, 4, eos_id)


# ---------------------------------------------------------------------------------------------
# Drawing windows


class Windows:
    """A source's windows of seq_len + 1 tokens, numbered across its token arrays."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int) -> None:
        self.arrays, self.seq_len = arrays, seq_len
        per_array = np.array([max(0, (len(a) - 1) // seq_len) for a in arrays], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(per_array)])  # first window number of each array
        self.count = int(self.first[-1])

    def __getitem__(self, number: int) -> np.ndarray:
        array = int(np.searchsorted(self.first, number, side="right")) - 1
        start = (number - int(self.first[array])) * self.seq_len
        return self.arrays[array][start : start + self.seq_len + 1]


def block_counts(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Each source's windows per block, in proportion to the weights (largest remainder)."""
    exact = np.asarray(weights, dtype=np.float64) / sum(weights) * block
    counts = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - counts), kind="stable")
    counts[by_remainder[: block - counts.sum()]] += 1
    return counts


@functools.lru_cache(maxsize=4)
def _block_layout(seed: int, block: int, counts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Which source each window of the block comes from, and how many of that source's windows
    came before it in the block."""
    labels = np.random.default_rng([seed, block]).permutation(np.repeat(np.arange(len(counts)), counts))
    before = np.empty(len(labels), dtype=np.int64)
    for source in range(len(counts)):
        where = np.flatnonzero(labels == source)
        before[where] = np.arange(len(where))
    return labels, before


@functools.lru_cache(maxsize=16)
def _source_order(seed: int, source: int, epoch: int, n_windows: int) -> np.ndarray:
    return np.random.default_rng([seed, source, epoch, 1]).permutation(n_windows)


class MixtureWindows:
    """A sampler: windows drawn from weighted sources, at a place in the run (no thread, no position)."""

    def __init__(self, data: MixtureData, batch_size: int, seq_len: int, seed: int, eos_id: int | None = None) -> None:
        self.batch_size, self.seq_len, self.seed, self.eos_id = batch_size, seq_len, seed, eos_id
        self.names = [s.source.name for s in data.sources]
        self.windows = [Windows(s.train, seq_len) for s in data.sources]
        self.counts = block_counts([s.source.weight for s in data.sources])
        for name, windows, count in zip(self.names, self.windows, self.counts, strict=True):
            if count and not windows.count:
                raise UserError(
                    f"data.sources: {name} gives fewer than one window of data.seq_len + 1 = {seq_len + 1} "
                    "training tokens; add text or lower data.seq_len"
                )
        self.n_windows = sum(w.count for w in self.windows)

    def draw(self, window: int) -> tuple[int, int]:
        """Global window number -> (source, how many windows that source gave before it)."""
        block, at = divmod(window, BLOCK)
        labels, before = _block_layout(self.seed, block, tuple(self.counts.tolist()))
        source = int(labels[at])
        return source, block * int(self.counts[source]) + int(before[at])

    def window(self, number: int) -> np.ndarray:
        source, drawn = self.draw(number)
        windows = self.windows[source]
        epoch, within = divmod(drawn, windows.count)
        return windows[int(_source_order(self.seed, source, epoch, windows.count)[within])]

    def sources(self, first: int) -> list[int]:
        """The source of each window of the batch whose first window has place `first`."""
        return [self.draw(g)[0] for g in range(first, first + self.batch_size)]

    def batch(self, first: int) -> Batch:
        return windows_batch(np.stack([self.window(g) for g in range(first, first + self.batch_size)]), self.eos_id)

    def drawn(self, total: int) -> np.ndarray:
        """Windows each source has given over the first `total` windows of the run."""
        block, at = divmod(total, BLOCK)
        labels, _ = _block_layout(self.seed, block, tuple(self.counts.tolist()))
        within = np.bincount(labels[:at], minlength=len(self.counts))
        return block * self.counts + within


class MixtureLoader(Prefetcher):
    """`MixtureWindows` prefetched; says when a source runs out and repeats."""

    def __init__(
        self,
        data: MixtureData,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prefetch: int = 4,
        eos_id: int | None = None,
    ) -> None:
        super().__init__(MixtureWindows(data, batch_size, seq_len, seed, eos_id), rank, world_size, device, prefetch)
        self.names, self.windows = self.sampler.names, self.sampler.windows
        self._announced = self.source_epochs()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._announced = self.source_epochs()

    def window_sources(self, step: int) -> list[int]:
        return self.sampler.sources(self.first_window(step))

    def drawn(self, step: int) -> np.ndarray:
        """Windows each source has given over the first `step` global micro-batches."""
        return self.sampler.drawn(self.offset + step * self.batch_size * self.world_size)

    def source_epochs(self) -> list[int]:
        """The epoch each source is in (0 = its first pass), after the micro-batches handed out."""
        drawn = self.drawn(self.step)
        return [int(d // w.count) if w.count else 0 for d, w in zip(drawn, self.windows, strict=True)]

    def __next__(self) -> Batch:
        batch = super().__next__()
        epochs = self.source_epochs()
        if self.rank == 0 and epochs != self._announced:
            for name, was, now in zip(self.names, self._announced, epochs, strict=True):
                if now > was:
                    tqdm.write(f"data: source {name} ran out and repeats (epoch {now + 1}) at micro-batch {self.step}")
        self._announced = epochs
        return batch
