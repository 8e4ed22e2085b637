"""Loading a model for generation and streaming its text, for `smollm2 generate`, chat and the Space."""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from smollm2.config import SEED_LIMIT
from smollm2.cpu_packing import PackedSmolLM2, can_pack, pack_for_cpu_inference, quantize_for_cpu_inference
from smollm2.errors import UserError
from smollm2.generation import Sampling, check_new_tokens, fit_new_tokens, prompt_ids, stream
from smollm2.hardware import (
    DecodePrecision,
    choose_decode_precision,
    decode_step_seconds,
    remember_decoding,
    remembered_decoding,
)
from smollm2.model import SmolLM2
from smollm2.model_source import ModelSource
from smollm2.tokenizer import Tokenizer


def load_for_inference(
    source: str | Path, device: str = "cpu", precision: str = "fp32", pack: bool = True
) -> tuple[SmolLM2, Tokenizer]:
    """A model and its tokenizer from a checkpoint (.pt), a run folder, its final/ or a HF Llama folder,
    in the weights `hardware.choose_decode_precision` picks (kept as the model's `decode_precision`).
    On a CPU the packed and plain paths of those weights (and for auto, fp32 and bf16) are timed on
    whole decode steps the first time this machine decodes a model of this shape; the choice is then
    remembered (`hardware.remembered_decoding`), so later starts build only the one chosen.
    pack=False for scoring many tokens at once (evaluation): the packed layout, chosen for one row
    at a time, made batches of prompts 2-5x slower here; auto then measures nothing (fp32 on a CPU)."""
    model, tokenizer = ModelSource.open(source).load()
    if tokenizer is None:
        raise UserError(f"{source}: no tokenizer found beside the model")
    model = model.to(device).eval()
    target = torch.device(device)
    if precision != "int8" and pack and target.type == "cpu" and can_pack(model):
        chosen = remembered_decoding(model.config, precision)
        if chosen is None:
            candidates = decode_candidates(model, ["fp32", "bf16"] if precision == "auto" else [precision])
            chosen = choose_decode_precision(precision, model.config, target, decode_step_seconds(candidates))
            remember_decoding(model.config, precision, chosen)
            model = candidates[chosen.name]
        else:
            model = in_precision(model, chosen, chosen.packed)
    else:
        chosen = choose_decode_precision(precision, model.config, target)
        model = in_precision(model, chosen, pack)
        chosen = dataclasses.replace(chosen, packed=isinstance(model, PackedSmolLM2))  # as it is, not as asked
    model.decode_precision = chosen
    return model, tokenizer


def in_precision(model: SmolLM2, chosen: DecodePrecision, pack: bool) -> SmolLM2:
    """An fp32 `model` in the chosen weights (int8: always quantized), packed when asked and useful."""
    if chosen.key == "int8":
        if model.embed_tokens.weight.device.type != "cpu":
            raise UserError("--precision int8 decodes on a CPU only; use bf16 on a GPU")
        return quantize_for_cpu_inference(model)
    model = model.to(dtype=chosen.dtype or torch.float32)
    return pack_for_cpu_inference(model) if pack else model


def decode_candidates(model: SmolLM2, keys: list[str] | None = None) -> dict[str, SmolLM2]:
    """What a CPU decoding choice measures: the weights in `keys` (default fp32 and bf16), each plain and
    packed (a name `DecodePrecision.name` gives back). A packed one shares the embedding and norms of its
    plain one; fp32 is `model` itself."""
    candidates = {}
    for key in keys or ["fp32", "bf16"]:
        plain = model if key == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
        candidates |= {key: plain, f"{key} packed": pack_for_cpu_inference(plain)}
    return candidates


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
