"""Loading a model for generation and streaming its text, for `smollm2 generate`, chat and the Space."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from smollm2.config import SEED_LIMIT
from smollm2.cpu_packing import pack_for_cpu_inference
from smollm2.errors import UserError
from smollm2.generation import Sampling, check_new_tokens, fit_new_tokens, prompt_ids, stream
from smollm2.hardware import choose_decode_precision
from smollm2.model import SmolLM2
from smollm2.model_source import ModelSource
from smollm2.tokenizer import Tokenizer


def load_for_inference(
    source: str | Path, device: str = "cpu", precision: str = "fp32", pack: bool = True
) -> tuple[SmolLM2, Tokenizer]:
    """A model and its tokenizer from a checkpoint (.pt), a run folder, its final/ or a HF Llama folder.
    pack=False for scoring many tokens at once (evaluation): the packed layout, chosen for one row
    at a time, made batches of prompts 2-5x slower here."""
    model, tokenizer = ModelSource.open(source).load()
    if tokenizer is None:
        raise UserError(f"{source}: no tokenizer found beside the model")
    chosen = choose_decode_precision(precision, model.config, torch.device(device))
    model = model.to(device=device, dtype=chosen.dtype or torch.float32).eval()
    return (pack_for_cpu_inference(model) if pack else model), tokenizer


def stream_text(
    model: SmolLM2,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece, never splitting a multi-byte character."""
    check_new_tokens(max_new_tokens)
    ids = prompt_ids(tokenizer, prompt, model.config.max_seq_len)
    generator = seeded_generator(model, seed)
    max_new = fit_new_tokens(ids, max_new_tokens, model.config.max_seq_len)
    if max_new < max_new_tokens:
        print(
            f"note: the continuation is cut to {max_new} tokens by the model's context "
            f"({model.config.max_seq_len} tokens, {len(ids)} of them the prompt's)",
            file=sys.stderr,
        )
    yield from stream_pieces(model, tokenizer, ids, max_new, sampling, tokenizer.eos_id, generator)


def seeded_generator(model: SmolLM2, seed: int) -> torch.Generator:
    if not 0 <= seed < SEED_LIMIT:
        raise UserError(f"seed must be in [0, 2**63), got {seed}")
    return torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)


def stream_pieces(
    model: SmolLM2,
    tokenizer: Tokenizer,
    ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    stop_id: int | None,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """The text that follows `ids`, piece by piece, up to `stop_id` (not shown); a piece never splits a
    multi-byte character."""
    produced: list[int] = []
    printed = ""
    for step in stream(model, [ids], max_new_tokens, sampling, eos_id=stop_id, generator=generator):
        token = int(step[0])
        if token == stop_id:
            break
        produced.append(token)
        text = tokenizer.decode(produced)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(printed) :]
            printed = text
    rest = tokenizer.decode(produced)[len(printed) :]
    if rest:
        yield rest
