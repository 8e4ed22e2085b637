"""Folders of datatrove-tokenized files as training sources, read where they lie (never re-tokenized).

datatrove's `DocumentTokenizer` (the step that tokenized FineWeb; it runs the same pipeline
locally or on Slurm) writes, per task, `NAME.ds`: the token ids, little-endian uint16 or uint32,
an end-of-text token after each document when asked (`eos_token`); `NAME.ds.index`: the document
ends in tokens (uint64); `NAME.ds.metadata`: `tokenizer|token size`, then the token count. A
source folder holding `.ds` files is such a source: each file is memory-mapped (its ids checked
once to be the run's tokenizer's, so none indexes past the model's embedding), a window never spans
two files, and the validation split is the last `data.val_fraction` of the last file's documents
(datatrove shuffles documents within a file by default, so that is a fair sample).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from smollm2.data import SUFFIXES, check_token_ids
from smollm2.errors import UserError
from smollm2.files import open_regular
from smollm2.tokenizer import END_OF_TEXT, Tokenizer, load_tokenizer

DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def is_datatrove_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.ds"))


def read_datatrove_folder(
    folder: Path, tokenizer: Tokenizer, tokenizer_spec: str, val_fraction: float
) -> tuple[list[np.ndarray], np.ndarray]:
    """(train token arrays, validation tokens) of a folder of DocumentTokenizer output."""
    files = sorted(folder.glob("*.ds"))
    arrays = [_read_tokens(file, tokenizer, tokenizer_spec) for file in files]
    if not sum(len(a) for a in arrays):
        raise UserError(f"{folder}: its .ds files hold no tokens")
    # the last file with tokens: with more --tasks than input files, the last ones are empty
    last = max(i for i, a in enumerate(arrays) if len(a))
    cut = _validation_start(files[last], len(arrays[last]), val_fraction)
    arrays[last], val = arrays[last][:cut], arrays[last][cut:]
    return arrays, val


def check_datatrove_folder(folder: Path) -> None:
    """What can be checked before any source is prepared: token files (no links), tokens in them,
    and no text files beside them."""
    link = next((file for file in sorted(folder.glob("*.ds*")) if file.is_symlink()), None)
    if link is not None:
        raise UserError(f"{link} is a symlink: refusing to follow it (smollm2 follows no link)")
    if not sum(file.stat().st_size for file in folder.glob("*.ds")):
        raise UserError(f"{folder}: its .ds files hold no tokens")
    text = next((p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in SUFFIXES), None)
    if text is not None:
        raise UserError(
            f"{folder}: holds datatrove .ds files and {text.name}, which would be left out: "
            "give the text files as a source of their own"
        )


def tokenizer_of(file: Path) -> tuple[str, int]:
    """(tokenizer name or path, token size in bytes) from the .metadata datatrove writes beside a file."""
    metadata = file.with_name(file.name + ".metadata")
    try:
        with open_regular(metadata) as f:  # a link out of the folder is refused, not followed
            name, _, size = f.read().decode().splitlines()[0].rpartition("|")
        return name, int(size)
    except (OSError, IndexError, ValueError):
        raise UserError(
            f"{file}: no readable {metadata.name} beside it, so the tokenizer that made it is unknown "
            "(DocumentTokenizer writes one with save_final_metadata=True)"
        ) from None


def _read_tokens(file: Path, tokenizer: Tokenizer, tokenizer_spec: str) -> np.ndarray:
    name, token_size = tokenizer_of(file)
    if not _is_run_tokenizer(name, tokenizer, tokenizer_spec):
        raise UserError(
            f"{file}: tokenized with {name!r}, not this run's tokenizer (data.tokenizer={tokenizer_spec}, "
            f"hash {tokenizer.hash}); tokenize it with the run's tokenizer.json or set data.tokenizer to {name!r}"
        )
    with open_regular(file) as f:  # the mapping keeps its own descriptor
        size = os.fstat(f.fileno()).st_size
        if token_size not in DTYPES or size % token_size:
            raise UserError(f"{file}: not a datatrove token file of {token_size}-byte tokens")
        if size == 0:
            return np.zeros(0, dtype=DTYPES[token_size])
        tokens = np.memmap(f, dtype=DTYPES[token_size], mode="r")
    # its ids index the model's embedding: the run's tokenizer has at most model.vocab_size of them
    check_token_ids(tokens, file, tokenizer.id_limit, f"the {tokenizer.id_limit} ids of the run's tokenizer")
    return tokens


def _is_run_tokenizer(name: str, tokenizer: Tokenizer, tokenizer_spec: str) -> bool:
    """The metadata names a tokenizer file or folder (compared by content) or a hub id (by name)."""
    if Path(name).exists():
        try:
            return load_tokenizer(name).hash == tokenizer.hash
        except UserError:
            return False
    return name == tokenizer_spec


def _validation_start(file: Path, n_tokens: int, val_fraction: float) -> int:
    """Where the last val_fraction of the file's documents begins (at a document start)."""
    index = file.with_name(file.name + ".index")
    if val_fraction == 0 or not (index.is_file() or index.is_symlink()):
        return n_tokens
    with open_regular(index) as f:
        data = f.read()
    ends = np.frombuffer(data[: len(data) // 8 * 8], dtype="<u8")
    starts = np.concatenate([[0], ends[:-1]])
    first_val = np.flatnonzero(starts >= (1 - val_fraction) * n_tokens)
    return int(starts[first_val[0]]) if len(first_val) else n_tokens


def check_tokenize_folders(corpus: Path, out: Path, logs: Path, resume: bool) -> None:
    """A tokenizing run writes into a new or empty folder, with logs of its own (datatrove skips
    every task its logs mark completed, so another run's logs would leave the output stale);
    --resume finishes the unfinished tasks of the run whose logs are there."""
    if not corpus.is_dir():
        raise UserError(f"--input {corpus} is not a folder of .jsonl or .parquet files")
    if resume:
        if not logs.is_dir() or not any(logs.iterdir()):
            raise UserError(f"--resume: {logs} holds no earlier run's logs to finish; leave --resume out")
        return
    for flag, folder in (("--out", out), ("--logs", logs)):
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise UserError(
                f"{flag} {folder} already holds files: choose a new or empty folder, or add --resume to finish "
                "the run that wrote them"
            )


def tokenize_steps(
    corpus: str, tokenizer: str, out: str, file_format: str = "jsonl", text_key: str = "text", shuffle: bool = True
) -> list:
    """datatrove's steps that turn a folder of .jsonl or .parquet files into such a source: the same
    list runs under `LocalPipelineExecutor` (one machine) or `SlurmPipelineExecutor` (a cluster)."""
    from datatrove.pipeline.readers import JsonlReader, ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    reader = {"jsonl": JsonlReader, "parquet": ParquetReader}[file_format]
    return [
        reader(corpus, text_key=text_key),
        DocumentTokenizer(out, tokenizer, eos_token=END_OF_TEXT, shuffle_documents=shuffle),
    ]
