"""Packed vs padded conversations for supervised fine-tuning: training tokens/s on this machine.

The model of config/sft-tiny.yaml, its conversations (examples/conversations.jsonl) and tokenizer;
one training step (forward, backward, AdamW) over the same conversations both ways:
- packed: rows of data.seq_len tokens holding several conversations each, with document ids (no
  attention across conversations; what smollm2.sft does);
- padded: one conversation a row, padded to the longest of the batch (plain causal attention).
Tokens/s counts the conversations' own tokens (not padding) over all timed steps; the two layouts
take turns step by step, so that a busy machine slows both alike. One table a precision (bf16:
autocast). Prints Markdown.

    python bench/sft_packing.py [--steps 20] [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from report import spread

from smollm2 import sft
from smollm2.config import load_config
from smollm2.hardware import keep_freed_memory_on_cpu
from smollm2.model import SmolLM2
from smollm2.trainer import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "sft-tiny.yaml"


def padded_batches(conversations: list[sft.Conversation], per_batch: int, pad_id: int) -> list[dict]:
    batches = []
    for first in range(0, len(conversations) - per_batch + 1, per_batch):
        group = conversations[first : first + per_batch]
        longest = max(len(c.ids) for c in group)
        ids = torch.full((per_batch, longest), pad_id)
        targets = torch.full((per_batch, longest), sft.IGNORE)
        for row, c in enumerate(group):
            ids[row, : len(c.ids)] = torch.tensor(c.ids)
            targets[row, : len(c.ids)] = torch.tensor(c.targets)
        batches.append({"input_ids": ids, "targets": targets})
    return batches


def packed_batches(conversations: list[sft.Conversation], rows_per_batch: int, seq_len: int, pad_id: int):
    rows = sft.pack(conversations, seq_len, pad_id)
    starts = range(0, len(rows) - rows_per_batch + 1, rows_per_batch)
    return [rows.batch(range(first, first + rows_per_batch)) for first in starts]


class Contender:
    """One layout's model, optimizer and batches; `step` times one training step."""

    def __init__(self, config, batches: list[dict], pad_id: int) -> None:
        torch.manual_seed(0)
        self.model = SmolLM2(config.model)
        self.optimizer = make_optimizer(self.model, config.train, torch.device("cpu"))
        self.batches, self.pad_id = batches, pad_id
        self.times: list[float] = []
        self.tokens: list[int] = []

    def step(self, index: int, dtype, record: bool) -> None:
        batch = self.batches[index % len(self.batches)]
        tick = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = self.model(**batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - tick)
            self.tokens.append(int((batch["input_ids"] != self.pad_id).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    args = parser.parse_args()
    keep_freed_memory_on_cpu()
    config = load_config(CONFIG, [f"data.path={ROOT / 'examples' / 'conversations.jsonl'}"])
    files = sft.resolve_sources(config.data.path)
    conversations = list(sft.read_conversations(files))
    tokenizer = sft.chat_tokenizer(config, [m for _, m in conversations])
    encoded = sft.encode_all(tokenizer, conversations, config.data.seq_len)
    seq_len, rows = config.data.seq_len, config.train.batch_size
    pad_id = config.model.vocab_size - 1  # a row of the embedding no token uses: padding is told apart by its id
    assert tokenizer.vocab_size <= pad_id
    packed = packed_batches(encoded, rows, seq_len, pad_id)
    per_row = sum(len(c.ids) for c in encoded) / len(sft.pack(encoded, seq_len, pad_id))
    per_batch = round(rows * per_row / np.mean([len(c.ids) for c in encoded]))  # the same conversations a step
    padded = padded_batches(encoded, per_batch, pad_id)
    padding = sum(int((b["input_ids"] == pad_id).sum()) for b in padded) / sum(b["input_ids"].numel() for b in padded)
    parameters = SmolLM2(config.model).num_parameters()
    print("## Fine-tuning on conversations: packed vs padded\n")
    print(
        f"`python bench/sft_packing.py --steps {args.steps} --precision {' '.join(args.precision)}`. Model: "
        f"`config/sft-tiny.yaml` ({parameters:,} parameters), {len(encoded):,} conversations of "
        f"{np.mean([len(c.ids) for c in encoded]):.0f} tokens on average ({padding:.0%} of the padded layout's "
        f"slots are padding); {args.steps} timed steps each after two to warm up, the layouts taking turns step by "
        "step; s/step and tokens/s: median (min-max) over the steps, the ratio of the steps timed next to each other."
    )
    for precision in args.precision:
        contenders = {"packed": Contender(config, packed, pad_id), "padded": Contender(config, padded, pad_id)}
        dtype = torch.bfloat16 if precision == "bf16" else None
        for index in range(args.steps + 2):  # the two take turns, so that a busy machine slows both alike
            for contender in contenders.values():
                contender.step(index, dtype, record=index >= 2)  # two steps warm up the allocator and kernels
        print(table(precision, contenders))


def table(precision: str, contenders: dict[str, Contender]) -> str:
    what = "fp32" if precision == "fp32" else "bf16 autocast"
    lines = [
        f"\n{what}:\n",
        "| layout | batch shape (first) | conversation tokens / step | s/step | conversation tokens/s | vs padded |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rates = {name: [n / t for n, t in zip(c.tokens, c.times, strict=True)] for name, c in contenders.items()}
    for name, contender in contenders.items():
        shape = tuple(contender.batches[0]["input_ids"].shape)
        against = [r / p for r, p in zip(rates[name], rates["padded"], strict=True)]
        lines.append(
            f"| {name} | {shape[0]} x {shape[1]} | {round(np.mean(contender.tokens)):,} | "
            f"{spread(contender.times, '{:.3f}')} | {spread(rates[name], '{:,.0f}')} | "
            f"{spread(against, '{:.2f}', 'x')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
