"""Supervised fine-tuning data (data.format: chat): conversations -> packed rows -> batches.

Each line of a .jsonl file (or row of a .parquet file) holds {"messages": [{"role", "content"}, ...]}.
A conversation is rendered with the tokenizer's chat template and encoded whole; its targets are
the next tokens where those are the assistant's, -100 (ignored by the loss) everywhere else.

Conversations are packed, in order, into rows of data.seq_len tokens, each tagged with its
conversation's document id, so the model restarts positions and attends within a conversation
only (smollm2.model.document_layout); the rest of a row is padding with ignored targets. Packed
rows trained more conversation tokens/s than padding each conversation to the longest of its batch
on a 2-core CPU, even with the shipped set's short, even conversations, padding's best case
(bench/sft_packing.py: the figures are in BENCHMARKS.md); and they have one shape. The rows are
made in seconds, so they are built in memory at start-up;
`RowBatches` draws them in data.window_order (a pure function of seed and place) and `ChatBatchLoader`
prefetches them (a `data.Prefetcher`),
so a resumed run sees the same batches, bitwise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smollm2.chat_template import (
    IGNORE,
    Message,
    check_messages,
    encode_conversation,
    render,
    render_template,
    training_targets,
)
from smollm2.config import Config
from smollm2.data import (
    Batch,
    Prefetcher,
    check_global_batch,
    jsonl_records,
    parquet_column,
    resolve_sources,
    say_without_validation,
    window_order,
)
from smollm2.errors import UserError
from smollm2.model_source import open_tokenizer
from smollm2.template_sandbox import TemplateLimit, TooLong
from smollm2.tokenizer import CHATML_TEMPLATE, Tokenizer, train_tokenizer

MESSAGES_FIELD = "messages"


@dataclass
class Conversation:
    ids: list[int]
    targets: list[int]


@dataclass
class PackedRows:
    """Rows of seq_len tokens: input ids, targets (-100 where ignored) and document ids, each (rows, seq_len)."""

    input_ids: np.ndarray
    targets: np.ndarray
    document_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, rows: np.ndarray | range) -> Batch:
        rows = np.asarray(rows)
        return {
            "input_ids": torch.from_numpy(self.input_ids[rows].astype(np.int64)),
            "targets": torch.from_numpy(self.targets[rows].astype(np.int64)),
            "document_ids": torch.from_numpy(self.document_ids[rows].astype(np.int64)),
        }

    @property
    def trained_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


@dataclass
class ChatData:
    """What the trainer needs of its data, as data.PreparedData gives it for text."""

    tokenizer: Tokenizer
    train: PackedRows
    val: PackedRows
    meta: dict


# ---------------------------------------------------------------------------------------------
# Reading


def read_conversations(files: list[Path]) -> Iterator[tuple[str, list[Message]]]:
    """(where, messages) for every conversation, checked: known roles, string contents, a reply."""
    for file in files:
        if file.suffix == ".jsonl":
            yield from _jsonl_conversations(file)
        elif file.suffix == ".parquet":
            yield from _parquet_conversations(file)
        else:
            raise UserError(f"data.path: {file} is not .jsonl or .parquet (data.format: chat reads conversations)")


def _jsonl_conversations(file: Path) -> Iterator[tuple[str, list[Message]]]:
    for where, record in jsonl_records(file):
        if not isinstance(record, dict) or MESSAGES_FIELD not in record:
            raise UserError(f"{where}: no {MESSAGES_FIELD!r} field (data.format: chat)")
        yield where, check_messages(record[MESSAGES_FIELD], where)


def _parquet_conversations(file: Path) -> Iterator[tuple[str, list[Message]]]:
    def missing(_schema) -> UserError:
        return UserError(f"{file}: no {MESSAGES_FIELD!r} column (data.format: chat)")

    for where, messages in parquet_column(file, MESSAGES_FIELD, missing):
        yield where, check_messages(messages, where)


# ---------------------------------------------------------------------------------------------
# Tokens and rows


def chat_tokenizer(config: Config, conversations: list[list[Message]], notes: list[str] | None = None) -> Tokenizer:
    """data.tokenizer, or with `train` a byte-level BPE trained on the conversations as ChatML renders them.
    `notes`: given, the note on a small vocabulary goes there (said once the conversations are accepted)."""
    if config.data.tokenizer != "train":
        return open_tokenizer(config.data.tokenizer, config.model.vocab_size)
    texts = (render_template(CHATML_TEMPLATE, messages) for messages in conversations)
    return train_tokenizer(texts, config.model.vocab_size, notes)


def _is_val_conversation(index: int, fraction: float) -> bool:
    """Exactly `fraction` of the conversations, spread evenly over the corpus, the first one early."""
    return int((index + 1) * fraction + 0.5) > int(index * fraction + 0.5)


def encode_all(
    tokenizer: Tokenizer, conversations: list[tuple[str, list[Message]]], seq_len: int
) -> list[Conversation]:
    encoded = []
    for where, messages in conversations:
        check_fits(tokenizer, messages, where, seq_len)
        ids, is_assistant = encode_conversation(tokenizer, messages)
        if len(ids) > seq_len:
            raise _too_long(where, f"is {len(ids)} tokens, longer than data.seq_len={seq_len}")
        encoded.append(Conversation(ids, training_targets(ids, is_assistant)))
    return encoded


def check_fits(tokenizer: Tokenizer, messages: list[Message], where: str, seq_len: int) -> None:
    """A conversation longer than data.seq_len is refused from one rendering of it, before it is
    rendered turn by turn (a prefix per assistant turn: 4,000 messages took 65 s to be refused).
    The rendering stops past the characters seq_len tokens can hold, and what it renders is what
    encode_conversation encodes, so a conversation that fits is never refused."""
    try:
        text = render(tokenizer, messages, context=seq_len)
    except TooLong:
        chars = tokenizer.max_chars(seq_len)
        raise _too_long(
            where, f"renders more than {chars:,} characters, more than data.seq_len={seq_len} tokens can hold"
        ) from None
    except TemplateLimit:  # past a bound of work that scales with the text: the default bounds decide
        return
    tokens = len(tokenizer.encode(text))
    if tokens > seq_len:
        raise _too_long(where, f"is {tokens} tokens, longer than data.seq_len={seq_len}")


def _too_long(where: str, size: str) -> UserError:
    return UserError(f"{where}: the conversation {size}: shorten it, or raise data.seq_len (up to model.max_seq_len)")


def pack(conversations: list[Conversation], seq_len: int, pad_id: int) -> PackedRows:
    """Next-fit, in order: a conversation goes into the current row if it fits, else starts the next."""
    rows: list[list[Conversation]] = []
    used = seq_len
    for conversation in conversations:
        if used + len(conversation.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(conversation)
        used += len(conversation.ids)
    shape = (len(rows), seq_len)
    input_ids = np.full(shape, pad_id, dtype=np.int32)
    targets = np.full(shape, IGNORE, dtype=np.int32)
    document_ids = np.zeros(shape, dtype=np.int32)
    for row, members in enumerate(rows):
        at = 0
        for document, conversation in enumerate(members):
            end = at + len(conversation.ids)
            input_ids[row, at:end] = conversation.ids
            targets[row, at:end] = conversation.targets
            document_ids[row, at:end] = document
            at = end
        document_ids[row, at:] = len(members)  # the padding is a document of its own
    return PackedRows(input_ids, targets, document_ids)


def prepare(
    config: Config,
    out_dir: str | Path = ".",
    quiet: bool = False,
    workers: int = 1,
    accept_tokenizer: Callable[[Tokenizer], None] | None = None,
) -> ChatData:
    """Read, check, tokenize and pack the conversations; a held-out share (data.val_fraction) for
    validation. In memory, in one process: conversation sets are small next to pretraining corpora.
    `accept_tokenizer` sees the tokenizer before the conversations are encoded (it raises to refuse)."""
    files = resolve_sources(config.data.path)
    conversations = list(read_conversations(files))
    if not conversations:
        raise UserError(f"data.path: {config.data.path!r} holds no conversation")
    notes: list[str] = []  # said once the conversations are accepted: a refusal is one line, the error
    tokenizer = chat_tokenizer(config, [messages for _, messages in conversations], notes)
    if tokenizer.eos_id is None:
        raise UserError(f"tokenizer {config.data.tokenizer}: no end-of-text token to pad with")
    if accept_tokenizer is not None:
        accept_tokenizer(tokenizer)
    encoded = encode_all(tokenizer, conversations, config.data.seq_len)
    held_out = [_is_val_conversation(index, config.data.val_fraction) for index in range(len(encoded))]
    train_conversations = [c for c, out in zip(encoded, held_out, strict=True) if not out]
    val_conversations = [c for c, out in zip(encoded, held_out, strict=True) if out]
    train = pack(train_conversations, config.data.seq_len, tokenizer.eos_id)
    val = pack(val_conversations, config.data.seq_len, tokenizer.eos_id)
    if len(train) == 0:
        raise UserError("data.path: every conversation went to validation; lower data.val_fraction")
    for note in notes:
        print(note, file=sys.stderr)
    meta = {
        "conversations": len(encoded),
        "train_rows": len(train),
        "val_rows": len(val),
        "train_tokens": sum(len(c.ids) for c in train_conversations),
        "trained_tokens": train.trained_tokens,
    }
    if not quiet:
        fill = meta["train_tokens"] / (len(train) * config.data.seq_len)
        print(
            f"data: {len(encoded):,} conversations packed into {len(train):,} train / {len(val):,} val rows of "
            f"{config.data.seq_len} tokens ({fill:.0%} filled); {meta['trained_tokens']:,} assistant tokens to learn"
        )
    return ChatData(tokenizer, train, val, meta)


# ---------------------------------------------------------------------------------------------
# Batches


class RowBatches:
    """A sampler: packed rows in the run's order (row i plays window i of `data.window_order`)."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int) -> None:
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.n_windows = len(rows)

    def batch(self, first: int) -> Batch:
        return self.rows.batch(window_order(first, self.batch_size, self.n_windows, self.seed))


class ChatBatchLoader(Prefetcher):
    """Packed rows (`RowBatches`) prefetched, in the order and with the state of every loader."""

    def __init__(self, rows: PackedRows, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu") -> None:  # fmt: skip
        super().__init__(RowBatches(rows, batch_size, seed), rank, world_size, device)
        check_global_batch(self.n_windows, seq_len, batch_size, world_size)


def eval_batches(rows: PackedRows, batch_size: int, seq_len: int, max_batches: int) -> list[Batch]:
    """The first held-out rows, in order: the same every evaluation."""
    count = min(len(rows), batch_size * max_batches)
    return [rows.batch(range(first, min(first + batch_size, count))) for first in range(0, count, batch_size)]


def make_loader(data: ChatData, config: Config, rank: int, world_size: int, device) -> ChatBatchLoader:
    settings = config.train
    return ChatBatchLoader(
        data.train, settings.batch_size, config.data.seq_len, settings.seed, rank, world_size, device
    )


def validation_sets(
    data: ChatData, config: Config, batch_size: int | None = None
) -> dict[str, tuple[list[Batch], float]]:
    """The held-out conversations: one validation set, train.eval_batches batches of `batch_size` rows
    (the run's validation batch size; None: train.batch_size). One line is said when it is empty."""
    settings = config.train
    batches = eval_batches(data.val, batch_size or settings.batch_size, config.data.seq_len, settings.eval_batches)
    if not batches:
        fraction = config.data.val_fraction
        reason = f"data.val_fraction={fraction} of {data.meta['conversations']} conversation(s) holds none out"
        if fraction:
            reason += f" (it takes the first from {math.ceil(0.5 / fraction)})"
        say_without_validation([""], reason)
    return {"": (batches, 1.0)}
