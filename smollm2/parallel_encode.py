"""The corpus's pieces encoded in batches, in order: in this process (the Rust encoder runs a batch
on its own threads), or with `prepare --workers N` by N spawned processes, memory bounded.

With workers, the main process reads the pieces and writes the tokens; each worker encodes batches
of text with its own copy of the tokenizer (one thread each: the processes are the parallelism). At
most two batches per worker are in flight, so memory does not grow with the corpus.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

BATCH_CHARACTERS = 4 << 20  # text encoded at once (sent to a worker at once)
IN_FLIGHT_PER_WORKER = 2

_worker_tokenizer: HFTokenizer | None = None


def _start_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    os.environ["RAYON_NUM_THREADS"] = "1"  # read when the tokenizer first runs in parallel
    _worker_tokenizer = HFTokenizer.from_str(tokenizer_json)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of every text, flat, and each text's count: cheap to send back."""
    encodings = _worker_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    arrays = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
    return np.concatenate(arrays), np.array([len(a) for a in arrays], dtype=np.int64)


def encode_pieces(pieces: Iterator, tokenizer, progress, workers: int = 1) -> Iterator[tuple[object, np.ndarray]]:
    """(piece, ids) for every piece, in order; an end-of-text token after each document's last piece."""
    if workers > 1:
        yield from _encode_in_processes(pieces, tokenizer, progress, workers)
        return
    for batch in _batches(pieces):
        encoded = tokenizer.encode_batch([p.text for p in batch])
        yield from _with_ends(batch, [np.asarray(ids, dtype=np.uint32) for ids in encoded], tokenizer.eos_id, progress)


def _encode_in_processes(pieces: Iterator, tokenizer, progress, workers: int) -> Iterator[tuple[object, np.ndarray]]:
    context = multiprocessing.get_context("spawn")  # a fork of a threaded process may deadlock
    with ProcessPoolExecutor(workers, context, _start_worker, (tokenizer.backend.to_str(),)) as pool:
        pending: deque[tuple[list, Future]] = deque()
        for batch in _batches(pieces):
            pending.append((batch, pool.submit(_encode, [p.text for p in batch])))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield from _results(*pending.popleft(), tokenizer.eos_id, progress)
        while pending:
            yield from _results(*pending.popleft(), tokenizer.eos_id, progress)


def _batches(pieces: Iterator) -> Iterator[list]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= BATCH_CHARACTERS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _results(batch: list, future: Future, eos_id: int, progress) -> Iterator[tuple[object, np.ndarray]]:
    flat, lengths = future.result()
    ends = np.cumsum(lengths)
    yield from _with_ends(
        batch, [flat[end - length : end] for end, length in zip(ends, lengths, strict=True)], eos_id, progress
    )


def _with_ends(batch: list, ids: list[np.ndarray], eos_id: int, progress) -> Iterator[tuple[object, np.ndarray]]:
    """Each piece with its ids, an end-of-text token after a document's last piece; progress in bytes."""
    for piece, piece_ids in zip(batch, ids, strict=True):
        progress.update(len(piece.text.encode()))
        yield piece, (np.append(piece_ids, np.uint32(eos_id)) if piece.ends_document else piece_ids)
