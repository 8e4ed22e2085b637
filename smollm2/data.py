"""From corpus to batches.

prepare(): text files / jsonl / parquet -> tokenizer.json, train.bin, val.bin, meta.json (token ids
as uint16 or uint32, read back with numpy memmap). The corpus is read in pieces cut where the
byte-level pre-tokenizer cuts anyway (after a newline followed by a printable ASCII character), so
the token files equal the direct encoding of the whole text, while memory stays bounded.

BatchLoader: (input, target) windows in an order that is a pure function of (seed, epoch, step,
rank, world size), so its state is one integer and a resumed run sees exactly the same batches.
"""

from __future__ import annotations

import glob
import json
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from smollm2.config import Config
from smollm2.errors import UserError, error_reason
from smollm2.files import build_folder, check_replaceable, clean_leftovers, inside_another, is_inside
from smollm2.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
PREPARED_FILES = frozenset({"meta.json", "tokenizer.json", "train.bin", "val.bin"})
SUFFIXES = (".txt", ".jsonl", ".parquet")
ENCODE_BATCH_BYTES = 4 << 20  # text handed to the (parallel) batch encoder at once

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
    """data.path: a file, a folder (searched recursively) or a glob of .txt / .jsonl / .parquet."""
    path = Path(spec) if Path(spec).is_absolute() else base / spec
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.path: the glob {spec!r} matches no file")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"data.path: folder {spec!r} holds no .txt, .jsonl or .parquet file")
    elif path.is_file():
        files = [path]
    else:
        what = "is not a regular file or folder" if path.exists() else "does not exist"
        raise UserError(f"data.path: {spec!r} {what}")
    unsupported = [f for f in files if f.suffix not in SUFFIXES]
    if unsupported:
        raise UserError(f"data.path: {unsupported[0]} is not a .txt, .jsonl or .parquet file")
    return files


def read_pieces(files: list[Path], piece_bytes: int, bad_bytes: dict[str, int], text_field: str) -> Iterator[Piece]:
    for file in files:
        if file.suffix == ".txt":
            yield from _text_pieces(file, piece_bytes, bad_bytes)
        elif file.suffix == ".jsonl":
            yield from _jsonl_pieces(file, text_field)
        else:
            yield from _parquet_pieces(file, text_field)


def _safe_cut(block: bytes) -> int:
    """The last offset where the pre-tokenizer cuts anyway: 'x\\n|y' with x and y printable ASCII.

    Whitespace on either side would join the newline into a longer whitespace pre-token.
    """
    at = len(block) - 1
    while True:
        at = block.rfind(b"\n", 1, at)
        if at < 0:
            return -1
        if 0x21 <= block[at - 1] < 0x7F and 0x21 <= block[at + 1] < 0x7F:
            return at + 1


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
            cut = _safe_cut(data)
            if cut <= 0:  # no safe cut yet (very long line): keep reading
                carry = data
                continue
            carry = data[cut:]
            yield Piece(_decode(data[:cut], file, bad_bytes), ends_document=False)


def _missing_field(where: str, kind: str, field: str, found: list[str]) -> UserError:
    """The text's field is not there: name it, what is there, and how to choose another."""
    there = f"its string {kind}s: {', '.join(found[:5])}; " if found else ""
    example = found[0] if found else "NAME"
    return UserError(
        f"{where}: no string {kind} {field!r} ({there}choose the {kind} with --set data.text_field={example})"
    )


def _jsonl_pieces(file: Path, text_field: str) -> Iterator[Piece]:
    with open(file, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{file}:{number}: not valid JSON ({exc.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    found = [k for k, v in record.items() if isinstance(v, str)] if isinstance(record, dict) else []
                    raise _missing_field(f"{file}:{number}", "field", text_field, found)
                yield Piece(text, ends_document=True)
        except UnicodeDecodeError as exc:
            raise UserError(f"{file}: not UTF-8 at byte {exc.start}") from None


def _parquet_pieces(file: Path, text_field: str) -> Iterator[Piece]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{file}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        reader = pq.ParquetFile(file)
        schema = reader.schema_arrow
        if text_field not in schema.names:
            strings = [f.name for f in schema if f.type in (pa.string(), pa.large_string(), pa.string_view())]
            raise _missing_field(str(file), "column", text_field, strings)
        for batch in reader.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise UserError(
                        f"{file}: the {text_field!r} column holds {type(text).__name__} values, not strings"
                    )
                yield Piece(text, ends_document=True)
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
    return Path(out_dir) / "data" / f"{name}-{config.model.vocab_size}"


def fingerprint(config: Config, files: list[Path]) -> dict:
    """What the prepared files depend on; any change rebuilds them."""
    tokenizer_spec = config.data.tokenizer
    if tokenizer_spec != "train":
        tokenizer_spec = load_tokenizer(tokenizer_spec).hash
    inputs = {
        "format": FORMAT_VERSION,
        "sources": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": tokenizer_spec,
        "vocab_size": config.model.vocab_size,
        "val_fraction": config.data.val_fraction,
    }
    if config.data.text_field != "text":  # only then: data prepared before text_field existed stays reusable
        inputs["text_field"] = config.data.text_field
    return inputs


def prepare(config: Config, out_dir: str | Path = ".", quiet: bool = False, workers: int = 1) -> PreparedData:
    """Tokenize the corpus into token files, or reuse the ones already there for the same inputs."""
    files = resolve_sources(config.data.path)
    folder = prepared_folder(config, out_dir)
    check_prepared_folder(folder, files, config.data.tokenizer)
    clean_leftovers(folder.parent, {folder.name})  # a killed build of this folder, even when it is reused
    expected = fingerprint(config, files)
    meta = read_meta(folder)
    if meta is not None and meta.get("fingerprint") == expected:
        if not quiet:
            print(f"data: reusing {folder} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)")
        return _open(folder, meta)
    # Only a folder about to be replaced must be provably ours: one reused above is only read.
    check_replaceable(folder, "data", "the prepared data folder", PREPARED_FILES)
    with build_folder(folder, "data") as staging:  # the old folder stays whole until the new one is complete
        meta = _build(config, files, staging, expected, quiet, workers)
    return _open(folder, meta)


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
    """The prepared folder's meta.json; None when absent or unreadable (a crash, a hand edit): rebuild."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    needed = {"fingerprint", "dtype", "train_tokens", "val_tokens"}
    if (
        not isinstance(meta, dict)
        or not needed <= meta.keys()
        or not PREPARED_FILES <= {p.name for p in folder.iterdir()}
    ):
        return None
    return meta


def _build(config: Config, files: list[Path], staging: Path, expected: dict, quiet: bool, workers: int = 1) -> dict:
    total_bytes = sum(f.stat().st_size for f in files)
    # ~100 pieces over the corpus (4 KB to 256 KB each): the validation split takes whole pieces.
    piece_bytes = max(4 << 10, min(256 << 10, total_bytes // 100))
    bad_bytes: dict[str, int] = {}
    if total_bytes == 0:
        raise UserError(f"data.path: the corpus {config.data.path!r} is empty")
    if config.data.tokenizer == "train":
        if not quiet:
            print(f"data: training a {config.model.vocab_size}-token BPE tokenizer on {total_bytes / 1e6:.1f} MB")
        texts = (p.text for p in read_pieces(files, piece_bytes, {}, config.data.text_field))
        tokenizer = train_tokenizer(texts, config.model.vocab_size)
    else:
        tokenizer = load_tokenizer(config.data.tokenizer, config.model.vocab_size)
    tokenizer.save(staging / "tokenizer.json")
    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {config.data.tokenizer}: no end-of-text token (<|endoftext|>, </s> or <eos>)")
    dtype = np.uint16 if config.model.vocab_size <= 1 << 16 else np.uint32
    counts = {"train": 0, "val": 0}
    has_text = False
    progress = tqdm(
        total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=True if quiet else None, leave=False
    )
    with open(staging / "train.bin", "wb") as train_file, open(staging / "val.bin", "wb") as val_file:
        outputs = {"train": train_file, "val": val_file}
        pieces = read_pieces(files, piece_bytes, bad_bytes, config.data.text_field)
        if workers > 1:
            from smollm2.parallel_encode import encode_in_processes

            encoded = encode_in_processes(pieces, tokenizer, progress, workers)
        else:
            encoded = _encode_pieces(pieces, tokenizer, progress)
        for index, (piece, ids) in enumerate(encoded):
            split = "val" if _is_val_piece(index, config.data.val_fraction) else "train"
            outputs[split].write(np.asarray(ids, dtype=dtype).tobytes())
            counts[split] += len(ids)
            has_text = has_text or bool(piece.text.strip())
    progress.close()
    for file, count in bad_bytes.items():
        print(f"warning: {file}: replaced {count} undecodable byte sequence(s) with U+FFFD", file=sys.stderr)
    if not has_text:
        raise UserError(f"data.path: the corpus {config.data.path!r} is empty or only whitespace")
    if counts["train"] < config.data.seq_len + 1:
        raise UserError(
            f"data.path: the corpus gives {counts['train']} training tokens, fewer than one window of "
            f"data.seq_len + 1 = {config.data.seq_len + 1}; add text or lower data.seq_len"
        )
    meta = {
        "fingerprint": expected,
        "tokenizer_hash": tokenizer.hash,
        "dtype": np.dtype(dtype).name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "bytes": total_bytes,
        "undecodable_bytes": sum(bad_bytes.values()),
    }
    (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if not quiet:
        print(f"data: {counts['train']:,} train / {counts['val']:,} val tokens from {total_bytes / 1e6:.1f} MB")
    return meta


def _encode_pieces(pieces: Iterator[Piece], tokenizer: Tokenizer, progress: tqdm) -> Iterator[tuple[Piece, list]]:
    """Encode pieces in batches (the Rust encoder runs a batch in parallel), in order."""
    batch: list[Piece] = []
    size = 0

    def flush() -> Iterator[list[int]]:
        for piece, ids in zip(batch, tokenizer.encode_batch([p.text for p in batch]), strict=True):
            progress.update(len(piece.text.encode()))
            yield piece, (ids + [tokenizer.eos_id] if piece.ends_document else ids)

    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= ENCODE_BATCH_BYTES:
            yield from flush()
            batch, size = [], 0
    yield from flush()


def _is_val_piece(index: int, fraction: float) -> bool:
    """Exactly `fraction` of the pieces, spread evenly over the corpus, the first one early."""
    return int((index + 1) * fraction + 0.5) > int(index * fraction + 0.5)


def _open(folder: Path, meta: dict) -> PreparedData:
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    return PreparedData(
        folder=folder,
        tokenizer=tokenizer,
        train=read_tokens(folder / "train.bin", meta["dtype"]),
        val=read_tokens(folder / "val.bin", meta["dtype"]),
        meta=meta,
    )


def read_tokens(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------------------------
# Batches


class BatchLoader:
    """Random (input, target) windows of seq_len tokens, prefetched by a background thread.

    The corpus is cut into non-overlapping windows of seq_len + 1 tokens (neighbours share one
    token: the last target of one is the first input of the next). Each epoch visits every window
    at most once in an order drawn from (seed, epoch); micro-batch m of rank r takes its slice of
    global micro-batch m, so ranks never share a window.
    """

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
        self.tokens = tokens
        self.set_up(batch_size, seq_len, seed, rank, world_size, device, prefetch, eos_id)
        self.n_windows = (len(tokens) - 1) // seq_len
        self.batches_per_epoch = self.n_windows // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise UserError(
                f"the training data holds {self.n_windows} windows of {seq_len + 1} tokens, fewer than one "
                f"global micro-batch of {batch_size * world_size}; lower train.batch_size or data.seq_len"
            )

    def set_up(
        self, batch_size: int, seq_len: int, seed: int, rank: int, world_size: int, device, prefetch: int, eos_id
    ) -> None:
        """What every loader shares: the order's inputs, the position, and the prefetching thread's state."""
        self.batch_size, self.seq_len, self.seed, self.eos_id = batch_size, seq_len, seed, eos_id
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.step = 0  # micro-batches handed out so far
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # The state is the position alone: everything else is recomputed from the constructor's inputs.
    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume after the same number of windows, also in another world size or micro-batch size
        (exactly when the new global micro-batch divides the windows already consumed)."""
        self.close()
        consumed = int(state["step"]) * int(state["batch_size"]) * int(state["world_size"])
        self.step = consumed // (self.batch_size * self.world_size)

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    def window_starts(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.batches_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        first = (within * self.world_size + self.rank) * self.batch_size
        return order[first : first + self.batch_size] * self.seq_len

    def batch(self, step: int) -> Batch:
        return self.as_batch(np.stack([self.tokens[s : s + self.seq_len + 1] for s in self.window_starts(step)]))

    def as_batch(self, windows: np.ndarray) -> Batch:
        """(B, seq_len + 1) token windows -> the model's keyword arguments (pinned on CUDA)."""
        windows = torch.from_numpy(windows.astype(np.int64))
        if self.device.type == "cuda":
            windows = windows.pin_memory()
        batch = {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}
        if self.eos_id is not None:
            batch["document_ids"] = document_ids(batch["input_ids"], self.eos_id)
        return batch

    def __iter__(self) -> BatchLoader:
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
        windows = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        batch = {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}
        if eos_id is not None:
            batch["document_ids"] = document_ids(batch["input_ids"], eos_id)
        batches.append(batch)
    return batches
