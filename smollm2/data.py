"""From corpus to batches.

prepare(): text files / jsonl / parquet -> tokenizer.json, train.bin, val.bin, meta.json (token ids
as little-endian uint16 or uint32, read back with numpy memmap, each checked to be below
model.vocab_size when a folder is opened). The corpus is read in pieces of at most twice
piece_bytes, whatever its text (CRLF, any script, one line without an end), cut where the byte-level
pre-tokenizer cuts anyway (where whitespace follows a word), so the token files equal the direct
encoding of the whole text; only text without any whitespace is cut between two characters.

Batches by composition: a sampler answers "this rank's batch whose first window has place p in the
run" (`TokenWindows` here; mixture.MixtureWindows, sft.RowBatches), in an order that is a pure function
of (seed, place); `Prefetcher` hands them out ahead of time and owns the position, so a loader's state
is one integer (the windows handed out) and a resumed run sees exactly the same windows, in any batch
size or world size. `BatchLoader` is a Prefetcher over one corpus's `TokenWindows`.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from smollm2.config import Config
from smollm2.errors import CONTENT_ERRORS, UserError, content_reason, error_reason, read_json_file
from smollm2.files import (
    build_folder,
    check_replaceable,
    clean_leftovers,
    create_file,
    inside_another,
    is_inside,
    read_marker,
    write_atomic,
)
from smollm2.parallel_encode import encode_pieces
from smollm2.run_folder import RunFolder
from smollm2.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMAT_VERSION = 2  # 2: pieces cut at any text, the split by tokens (1: only between ASCII lines)
PREPARED_FILES = frozenset({"meta.json", "tokenizer.json", "train.bin", "val.bin"})
# What token files hold (by model.vocab_size), by the name meta.json gives: little-endian whatever the
# machine, and nothing else is ever memory-mapped (">u2" is also numpy's "uint16"; "object" maps bytes as pointers).
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SUFFIXES = (".txt", ".jsonl", ".parquet")

# A batch is the model's keyword arguments: input_ids and targets (B, T), and optionally
# document_ids (B, T) where a window packs several documents. Every loader yields these.
Batch = dict[str, torch.Tensor]


@dataclass
class Piece:
    text: str
    ends_document: bool  # an end-of-text token follows it


@dataclass
class PreparedData:
    folder: Path
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    meta: dict


# ---------------------------------------------------------------------------------------------
# Sources


def resolve_sources(spec: str, base: Path = Path(".")) -> list[Path]:
    """data.path: a file, a folder (searched recursively) or a glob of .txt / .jsonl / .parquet.
    Its errors carry the key data.path (a mixture says them of its source)."""
    path = Path(spec) if Path(spec).is_absolute() else base / spec
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"the glob {spec!r} matches no file", key="data.path")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"folder {spec!r} holds no .txt, .jsonl or .parquet file", key="data.path")
    elif path.is_file():
        files = [path]
    else:
        what = "is not a regular file or folder" if path.exists() else "does not exist"
        raise UserError(f"{spec!r} {what}", key="data.path")
    unsupported = [f for f in files if f.suffix not in SUFFIXES]
    if unsupported:
        raise UserError(f"{unsupported[0]} is not a .txt, .jsonl or .parquet file", key="data.path")
    return files


def read_pieces(files: list[Path], piece_bytes: int, bad_bytes: dict[str, int], text_field: str) -> Iterator[Piece]:
    for file in files:
        if file.suffix == ".txt":
            yield from _text_pieces(file, piece_bytes, bad_bytes)
        elif file.suffix == ".jsonl":
            yield from _jsonl_pieces(file, text_field)
        else:
            yield from _parquet_pieces(file, text_field)


ASCII_SPACE = b" \t\n\r\x0b\x0c"


def _cut(data: bytes) -> int:
    """Where a piece of `data` ends (the rest is carried into the next), in its second half, so a
    piece is never over twice piece_bytes whatever the text.

    First choice: where a run of whitespace holding a newline begins after a word, then one holding
    a space. The byte-level pre-tokenizer (GPT-2's pattern) ends a pre-token there anyway, so the
    pieces' tokens are the whole text's. Text without whitespace is cut between two characters.
    """
    half = len(data) // 2
    for separator in (b"\n", b" "):
        at = _word_end(data, separator, half)
        if at > 0:
            return at
    at = len(data) - 1  # before the last character's first byte (UTF-8 continuation bytes are 0x80-0xBF)
    while at > max(0, len(data) - 4) and 0x80 <= data[at] < 0xC0:
        at -= 1
    return at


def _word_end(data: bytes, separator: bytes, low: int) -> int:
    """The last offset above `low` where a run of ASCII whitespace holding `separator` follows a
    character that is not whitespace; -1 if there is none."""
    at = data.rfind(separator, low)
    while at > low:
        start = at
        while start > low and data[start - 1] in ASCII_SPACE:
            start -= 1
        if start > low and not _ends_in_space(data, start):
            return start
        at = data.rfind(separator, low, start)
    return -1


def _ends_in_space(data: bytes, end: int) -> bool:
    """Whether the character before `end` is whitespace beyond ASCII (U+00A0, U+3000, ...)."""
    if data[end - 1] < 0x80:
        return False
    start = end - 1
    while start > end - 4 and 0x80 <= data[start] < 0xC0:
        start -= 1
    return data[start:end].decode("utf-8", errors="replace").isspace()


def _decode(raw: bytes, file: Path, bad_bytes: dict[str, int]) -> str:
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())
    if replaced:
        bad_bytes[str(file)] = bad_bytes.get(str(file), 0) + replaced
    return text


def _text_pieces(file: Path, piece_bytes: int, bad_bytes: dict[str, int]) -> Iterator[Piece]:
    carry = b""
    with open(file, "rb") as f:
        while True:
            block = f.read(piece_bytes)
            data = carry + block
            if not block:
                if data:
                    yield Piece(_decode(data, file, bad_bytes), ends_document=True)
                return
            cut = _cut(data)
            carry = data[cut:]
            if cut:
                yield Piece(_decode(data[:cut], file, bad_bytes), ends_document=False)


def _missing_field(where: str, kind: str, field: str, found: list[str]) -> UserError:
    """The text's field is not there: name it, what is there, and how to choose another."""
    there = f"its string {kind}s: {', '.join(found[:5])}; " if found else ""
    example = found[0] if found else "NAME"
    return UserError(
        f"{where}: no string {kind} {field!r} ({there}choose the {kind} with --set data.text_field={example})"
    )


def _jsonl_pieces(file: Path, text_field: str) -> Iterator[Piece]:
    for where, record in jsonl_records(file):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            found = [k for k, v in record.items() if isinstance(v, str)] if isinstance(record, dict) else []
            raise _missing_field(where, "field", text_field, found)
        yield Piece(text, ends_document=True)


def _parquet_pieces(file: Path, text_field: str) -> Iterator[Piece]:
    def missing(schema) -> UserError:
        import pyarrow as pa

        strings = [f.name for f in schema if f.type in (pa.string(), pa.large_string(), pa.string_view())]
        return _missing_field(str(file), "column", text_field, strings)

    for _, text in parquet_column(file, text_field, missing):
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(f"{file}: the {text_field!r} column holds {type(text).__name__} values, not strings")
        yield Piece(text, ends_document=True)


def jsonl_records(file: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each line of a .jsonl file that is not blank: the one reader of .jsonl
    (text and conversations); a line that is not JSON, or bytes that are not UTF-8, are one line."""
    try:
        with open(file, encoding="utf-8", errors="strict") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except CONTENT_ERRORS as exc:  # nested too deeply, a number too long to convert
                    reason = exc.msg if isinstance(exc, json.JSONDecodeError) else content_reason(exc)
                    raise UserError(f"{where}: not valid JSON ({reason})") from None
                yield where, record
    except UnicodeDecodeError as exc:
        raise UserError(f"{file}: not UTF-8 at byte {exc.start}") from None


def parquet_column(file: Path, column: str, missing: Callable[[object], UserError]) -> Iterator[tuple[str, object]]:
    """(where, value) for each row of one column of a .parquet file: the one reader of .parquet;
    `missing(schema)` is the error for a file without the column, a damaged file is one line."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{file}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        reader = pq.ParquetFile(file)
        if column not in reader.schema_arrow.names:
            raise missing(reader.schema_arrow)
        number = 0
        for batch in reader.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                number += 1
                yield f"{file} row {number}", value
    except UserError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise UserError(f"{file}: not a readable parquet file ({error_reason(exc, 100)})") from None


# ---------------------------------------------------------------------------------------------
# Prepare


def prepared_folder(config: Config, out_dir: str | Path) -> Path:
    if config.data.prepared_dir:
        return Path(config.data.prepared_dir)
    name = Path(config.data.path.replace("*", "all")).stem or "corpus"
    return RunFolder(out_dir).data / f"{name}-{config.model.vocab_size}"


def fingerprint(config: Config, files: list[Path], tokenizer: Tokenizer | None) -> dict:
    """What the prepared files depend on; any change rebuilds them. `tokenizer`: the one given (None: trained)."""
    inputs = {
        "format": FORMAT_VERSION,
        "sources": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": "train" if tokenizer is None else tokenizer.hash,
        "vocab_size": config.model.vocab_size,
        "val_fraction": config.data.val_fraction,
    }
    if config.data.text_field != "text":  # only then: data prepared before text_field existed stays reusable
        inputs["text_field"] = config.data.text_field
    return inputs


def prepare(
    config: Config,
    out_dir: str | Path = ".",
    quiet: bool = False,
    workers: int = 1,
    tokenizer: Tokenizer | None = None,
    accept_tokenizer: Callable[[Tokenizer], None] | None = None,
) -> PreparedData:
    """Tokenize the corpus into token files, or reuse the ones already there for the same inputs.

    `tokenizer`: data.tokenizer as the pipeline resolved it (a checkpoint's is read above this module);
    None reads a tokenizer file or folder data.tokenizer names, or trains one when it says `train`.
    `accept_tokenizer` is called with the tokenizer as soon as it is known (read, reused or trained
    in memory), before any file is written: it raises to refuse it (the trainer checks its prompts)."""
    files = resolve_sources(config.data.path)
    folder = prepared_folder(config, out_dir)
    check_prepared_folder(folder, files, config.data.tokenizer)
    clean_leftovers(folder.parent, {folder.name})  # a killed build of this folder, even when it is reused
    if tokenizer is None and config.data.tokenizer != "train":
        tokenizer = load_tokenizer(config.data.tokenizer, config.model.vocab_size)
    expected = fingerprint(config, files, tokenizer)
    meta = read_meta(folder)
    if meta is not None and meta.get("fingerprint") == expected:
        prepared = _open(folder, meta, config.model.vocab_size)
        if accept_tokenizer is not None:
            accept_tokenizer(prepared.tokenizer)
        if not quiet:
            print(f"data: reusing {folder} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)")
        return prepared
    # Only a folder about to be replaced must be provably ours: one reused above is only read.
    check_replaceable(folder, "data", "the prepared data folder", PREPARED_FILES)
    corpus = Corpus.of(config, files)
    notes: list[str] = []  # said once the corpus is accepted: a refused one is one line, the error
    if tokenizer is None:  # in memory: nothing is written until it is accepted
        tokenizer = _train_on(config, corpus, quiet, notes)
    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {config.data.tokenizer}: no end-of-text token (<|endoftext|>, </s> or <eos>)")
    if accept_tokenizer is not None:
        accept_tokenizer(tokenizer)
    with build_folder(folder, "data") as staging:  # the old folder stays whole until the new one is complete
        meta = _build(config, corpus, staging, expected, quiet, workers, tokenizer, notes)
    return _open(folder, meta, config.model.vocab_size)


def _train_on(config: Config, corpus: Corpus, quiet: bool, notes: list[str]) -> Tokenizer:
    if not quiet:
        megabytes = corpus.total_bytes / 1e6
        print(f"data: training a {config.model.vocab_size}-token BPE tokenizer on {megabytes:.1f} MB")
    texts = (p.text for p in read_pieces(corpus.files, corpus.piece_bytes, {}, config.data.text_field))
    return train_tokenizer(texts, config.model.vocab_size, notes)


@dataclass(frozen=True)
class Corpus:
    """The files of data.path, their size, and the pieces they are read in."""

    files: list[Path]
    total_bytes: int
    piece_bytes: int

    @classmethod
    def of(cls, config: Config, files: list[Path]) -> Corpus:
        total_bytes = sum(f.stat().st_size for f in files)
        if total_bytes == 0:
            raise UserError(f"the corpus {config.data.path!r} is empty", key="data.path")
        # ~1000 pieces over the corpus (1 KB to 256 KB each): the validation split takes whole pieces.
        return cls(files, total_bytes, max(1 << 10, min(256 << 10, total_bytes // 1000)))


def check_prepared_folder(folder: Path, sources: list[Path], tokenizer: str) -> None:
    """The prepared folder never holds what it is prepared from (the corpus, data.tokenizer), nor
    lies inside a folder smollm2 wrote for something else; `prepare` replaces it only when it is a
    folder smollm2 prepared, or a new or empty one."""
    inside = next((f for f in sources if is_inside(f, folder)), None)
    if inside is not None:
        raise UserError(f"the prepared data folder {folder} holds the corpus itself ({inside}): choose another folder")
    if tokenizer != "train" and Path(tokenizer).exists() and is_inside(tokenizer, folder):
        raise UserError(
            f"the prepared data folder {folder} holds data.tokenizer itself ({tokenizer}): "
            "set data.prepared_dir to another folder"
        )
    where = inside_another(folder, prepared=True)
    if where:
        raise UserError(f"the prepared data folder {folder} {where}: choose another folder")


def read_meta(folder: Path) -> dict | None:
    """The prepared folder's meta.json; None when absent or unreadable (a crash, a hand edit: nested
    too deeply, token counts that are not counts, a dtype we never write): rebuild."""
    try:
        meta = read_json_file(folder / "meta.json", "a prepared data folder's meta.json")
    except (OSError, UserError):
        return None
    needed = {"fingerprint", "dtype", "train_tokens", "val_tokens"}
    if (
        not needed <= meta.keys()
        or not isinstance(meta["dtype"], str)
        or meta["dtype"] not in TOKEN_DTYPES
        or not all(_is_count(meta[f"{split}_tokens"]) for split in ("train", "val"))
        or not PREPARED_FILES <= {p.name for p in folder.iterdir()}
        or not _sizes_match(folder, meta)
    ):
        return None
    return meta


def prepared_digest(folder: Path) -> str | None:
    """The SHA-256 of a prepared folder's token files, train.bin then val.bin, as its marker recorded
    them when they were written; None when it records none (a folder an older smollm2 marked)."""
    files = read_marker(folder).get("files")
    recorded = [files.get(name) if isinstance(files, dict) else None for name in ("train.bin", "val.bin")]
    if not all(isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], str) for entry in recorded):
        return None
    return hashlib.sha256(f"{recorded[0][2]}\n{recorded[1][2]}".encode()).hexdigest()


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _sizes_match(folder: Path, meta: dict) -> bool:
    """Whether the token files hold the tokens meta.json counts (a truncated file is rebuilt, not trained on)."""
    try:
        size = TOKEN_DTYPES[meta["dtype"]].itemsize
        return all(
            (folder / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * size for split in ("train", "val")
        )
    except (KeyError, TypeError, ValueError, OSError):
        return False


def _build(
    config: Config,
    corpus: Corpus,
    staging: Path,
    expected: dict,
    quiet: bool,
    workers: int,
    tokenizer: Tokenizer,
    notes: list[str],
) -> dict:
    files, total_bytes = corpus.files, corpus.total_bytes
    bad_bytes: dict[str, int] = {}
    tokenizer.save(staging / "tokenizer.json")
    dtype = TOKEN_DTYPES["uint16" if config.model.vocab_size <= 1 << 16 else "uint32"]
    counts = {"train": 0, "val": 0}
    has_text, pieces_count = False, 0
    progress = tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=True if quiet else None, leave=False
    )
    with create_file(staging / "train.bin") as train_file, create_file(staging / "val.bin") as val_file:
        outputs = {"train": train_file, "val": val_file}
        pieces = read_pieces(files, corpus.piece_bytes, bad_bytes, config.data.text_field)
        for index, (piece, ids) in enumerate(encode_pieces(pieces, tokenizer, progress, workers)):
            split = "val" if _goes_to_val(len(ids), counts, config.data.val_fraction) else "train"
            outputs[split].write(np.asarray(ids, dtype=dtype).tobytes())
            counts[split] += len(ids)
            has_text = has_text or bool(piece.text.strip())
            pieces_count = index + 1
        for file in outputs.values():  # on disk before the folder is swapped in
            file.flush()
            os.fsync(file.fileno())
    progress.close()
    if not has_text:
        raise UserError(f"the corpus {config.data.path!r} is empty or only whitespace", key="data.path")
    if counts["train"] < config.data.seq_len + 1:
        raise UserError(
            f"the corpus gives {counts['train']} training tokens, fewer than one window of "
            f"data.seq_len + 1 = {config.data.seq_len + 1}; add text or lower data.seq_len",
            key="data.path",
        )
    for note in notes:
        print(note, file=sys.stderr)
    for file, count in bad_bytes.items():
        print(f"warning: {file}: replaced {count} undecodable byte sequence(s) with U+FFFD", file=sys.stderr)
    meta = {
        "fingerprint": expected,
        "tokenizer_hash": tokenizer.hash,
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "pieces": pieces_count,
        "bytes": total_bytes,
        "undecodable_bytes": sum(bad_bytes.values()),
    }
    write_atomic(staging / "meta.json", json.dumps(meta, indent=2) + "\n")
    if not quiet:
        print(f"data: {counts['train']:,} train / {counts['val']:,} val tokens from {total_bytes / 1e6:.1f} MB")
    return meta


def _goes_to_val(tokens: int, counts: dict[str, int], fraction: float) -> bool:
    """Whether a piece of `tokens` tokens is held out: whichever split keeps the validation tokens
    nearer `fraction` of those so far, so the share is exact to half a piece, spread over the corpus."""
    target = fraction * (counts["train"] + counts["val"] + tokens)
    return counts["val"] + tokens / 2 < target


def _open(folder: Path, meta: dict, vocab_size: int) -> PreparedData:
    """A prepared folder's tokenizer and token files, each id checked to be a row of the model's
    embedding (a reused folder's train.bin may hold anything: 0xff bytes were an IndexError in training)."""
    tokenizer = load_tokenizer(folder / "tokenizer.json", vocab_size)
    tokens = {split: read_tokens(folder / f"{split}.bin", meta["dtype"]) for split in ("train", "val")}
    for split, ids in tokens.items():
        check_token_ids(ids, folder / f"{split}.bin", vocab_size, f"model.vocab_size={vocab_size}")
    return PreparedData(folder=folder, tokenizer=tokenizer, train=tokens["train"], val=tokens["val"], meta=meta)


def read_tokens(path: Path, dtype: str) -> np.ndarray:
    """A token file memory-mapped as meta.json's `dtype`, one of TOKEN_DTYPES' names (little-endian)."""
    if dtype not in TOKEN_DTYPES:  # read_meta admits no other: a caller's mistake, never a file's
        raise ValueError(f"token files hold {', '.join(TOKEN_DTYPES)}, not {dtype!r}")
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPES[dtype])
    return np.memmap(path, dtype=TOKEN_DTYPES[dtype], mode="r")


def check_token_ids(tokens: np.ndarray, where: str | Path, limit: int, vocabulary: str) -> None:
    """Token ids read from a file (`where`: its path, as the refusal names it) must be below `limit`
    (`vocabulary` says what it is: the model's rows, a tokenizer's ids), or they index past the
    embedding deep inside training or scoring. Checked once a file, when it is opened: one pass of
    np.max, 10-25 ms per 100 MB in the page cache on a 2-core Xeon."""
    largest = int(tokens.max()) if len(tokens) else -1
    if largest >= limit:
        raise UserError(
            f"{where}: holds the token id {largest}, not below {vocabulary}: not tokens of this vocabulary "
            "(another tokenizer's, or a damaged file)"
        )


# ---------------------------------------------------------------------------------------------
# Batches


class Prefetcher:
    """A sampler's batches handed out in order, prepared ahead by a background thread.

    It owns what every loader shares: the position (micro-batches handed out, and the windows before
    the first of them after a resume in another shape) and its state_dict, the thread, pinning and the
    copy to the device, and close(). The sampler only answers "this rank's batch whose first window
    has place p in the run" (`sampler.batch(p)`) and says its `batch_size`, `seed` and `n_windows`.
    The order is a function of each window's place, so the state is the position alone.
    """

    def __init__(self, sampler, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 prefetch: int = 4) -> None:  # fmt: skip
        self.sampler = sampler
        self.batch_size, self.seed, self.n_windows = sampler.batch_size, sampler.seed, sampler.n_windows
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.step = 0  # micro-batches handed out so far
        self.offset = 0  # windows handed out before micro-batch 0 (a resume in another shape)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "windows": self.windows_handed_out,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "data_format": FORMAT_VERSION,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume after the same windows, also in another world size or micro-batch size: the order
        is a function of each window's place in the run, so it goes on at the next unseen window."""
        self.close()
        windows = state.get("windows", int(state["step"]) * int(state["batch_size"]) * int(state["world_size"]))
        self.step, self.offset = divmod(int(windows), self.batch_size * self.world_size)

    @property
    def windows_handed_out(self) -> int:
        """Windows of every rank's micro-batches so far: the run's position in its data."""
        return self.offset + self.step * self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self.windows_handed_out // self.n_windows

    @property
    def batches_per_epoch(self) -> int:
        return self.n_windows // (self.batch_size * self.world_size)

    def first_window(self, step: int) -> int:
        """The place in the run of this rank's first window of micro-batch `step`."""
        return self.offset + (step * self.world_size + self.rank) * self.batch_size

    def batch(self, step: int) -> Batch:
        """This rank's micro-batch `step`, on the CPU."""
        return self.sampler.batch(self.first_window(step))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Batch:
        if self._queue is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self.step += 1
        return to_device(item, self.device)

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self.step, self._queue), daemon=True)
        self._thread.start()

    def _produce(self, step: int, out: queue.Queue) -> None:
        try:
            while not self._stop.is_set():
                item = self.batch(step)
                if self.device.type == "cuda":  # pinned, so the copy to the GPU does not block
                    item = {name: tensor.pin_memory() for name, tensor in item.items()}
                while not self._stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except BaseException as exc:  # handed to the consumer, which raises it
            out.put(exc)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._queue, self._thread = None, None


class TokenWindows:
    """A sampler: the windows of seq_len + 1 tokens of one token array, in the run's order.

    The array is cut into non-overlapping windows (neighbours share one token: the last target of
    one is the first input of the next), numbered in the order handed out over all ranks (`window_order`).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, eos_id: int | None = None) -> None:
        self.tokens, self.batch_size, self.seq_len, self.seed, self.eos_id = tokens, batch_size, seq_len, seed, eos_id
        self.n_windows = (len(tokens) - 1) // seq_len

    def window_numbers(self, first: int) -> np.ndarray:
        return window_order(first, self.batch_size, self.n_windows, self.seed)

    def batch(self, first: int) -> Batch:
        starts = self.window_numbers(first) * self.seq_len
        return windows_batch(np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]), self.eos_id)


class BatchLoader(Prefetcher):
    """Random (input, target) windows of one corpus (`TokenWindows`), prefetched."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        prefetch: int = 4,
        eos_id: int | None = None,  # given: batches carry document_ids (data.document_mask)
    ) -> None:
        super().__init__(TokenWindows(tokens, batch_size, seq_len, seed, eos_id), rank, world_size, device, prefetch)
        check_global_batch(self.n_windows, seq_len, batch_size, world_size)

    def window_starts(self, step: int) -> np.ndarray:
        return self.sampler.window_numbers(self.first_window(step)) * self.sampler.seq_len


def check_global_batch(n_windows: int, seq_len: int, batch_size: int, world_size: int) -> None:
    """Refused: training data of fewer windows than one global micro-batch."""
    if n_windows // (batch_size * world_size) == 0:
        raise UserError(
            f"the training data holds {n_windows} windows of {seq_len + 1} tokens, fewer than one "
            f"global micro-batch of {batch_size * world_size}; lower train.batch_size or data.seq_len"
        )


def window_order(first: int, count: int, n_windows: int, seed: int) -> np.ndarray:
    """The windows at places first .. first + count in the run: place p is window order[p % n] of epoch
    p // n, the order drawn once an epoch from (seed, epoch), so every epoch visits every window once,
    ranks never share a window, and a resume in another batch size goes on at the next unseen window."""
    places = np.arange(first, first + count)
    epochs, within = np.divmod(places, n_windows)
    numbers = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):  # a micro-batch may span the end of an epoch
        mask = epochs == epoch
        numbers[mask] = _epoch_order(seed, int(epoch), n_windows)[within[mask]]
    return numbers


def windows_batch(windows: np.ndarray, eos_id: int | None = None) -> Batch:
    """(B, seq_len + 1) token windows -> the model's keyword arguments (document_ids given an eos_id)."""
    windows = torch.from_numpy(windows.astype(np.int64))
    batch = {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}
    if eos_id is not None:
        batch["document_ids"] = document_ids(batch["input_ids"], eos_id)
    return batch


@functools.lru_cache(maxsize=2)  # this epoch's and, while a micro-batch spans their end, the next
def _epoch_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    """The windows of an epoch in their order, drawn once: 4 bytes a window."""
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    return order.astype(np.uint32) if n_windows < 1 << 32 else order


def say_without_validation(empty: list[str], reason: str) -> None:
    """One line on stderr (rank 0) when the run will log no val_loss, or none for some sources: a
    validation set that came out empty is never silent. `empty` names them ("" for a run's only set)."""
    if not empty or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    if empty == [""]:
        print(f"warning: no validation set: {reason}; this run logs no val_loss", file=sys.stderr)
    else:
        print(f"warning: no validation set for data.sources {', '.join(empty)}: {reason}", file=sys.stderr)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Each token's document within its window: the end-of-text tokens before it, counted (an
    end-of-text token belongs to the document it closes)."""
    ends = (input_ids == eos_id).to(torch.int64)
    return ends.cumsum(dim=1) - ends


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int, eos_id: int | None = None
) -> list[Batch]:
    """The first windows of the validation split, in order: the same every evaluation."""
    seq_len = min(seq_len, len(tokens) - 1)
    if seq_len < 1:
        return []
    n_windows = (len(tokens) - 1) // seq_len
    batches = []
    for first in range(0, min(n_windows, batch_size * max_batches), batch_size):
        starts = range(first * seq_len, min(first + batch_size, n_windows) * seq_len, seq_len)
        batches.append(windows_batch(np.stack([tokens[s : s + seq_len + 1] for s in starts]), eos_id))
    return batches
