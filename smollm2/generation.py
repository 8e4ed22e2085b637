"""Generation: the KV cache, sampling, and the decoding loop around a SmolLM2.

`stream` yields the next token of every prompt step by step; `generate` collects them. Both work
on any SmolLM2, packed for CPU inference (smollm2.inference) or not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from smollm2.errors import UserError
from smollm2.model import KVCache, SmolLM2
from smollm2.tokenizer import Tokenizer


def padding_mask(valid: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """(B, 1, queries start..end, keys 0..end): causal, and blind to padding keys."""
    causal = torch.ones(end, end, dtype=torch.bool, device=valid.device).tril()[start:end]
    itself = torch.eye(end, dtype=torch.bool, device=valid.device)[start:end]
    # A padding query sees only itself: a row with no visible key would make NaNs.
    return ((causal[None] & valid[:, None, :end]) | itself)[:, None]


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        # Checked here, so the CLI, the Space and the trainer's predictions refuse the same values.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise UserError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


def check_text(text: str, what: str) -> str:
    """Text from the command line or a terminal that was not UTF-8 arrives with surrogates: refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} is not valid UTF-8 text") from None
    return text


def check_chars(tokenizer: Tokenizer, text: str, what: str, tokens: int) -> None:
    """Refuse a text with more characters than `tokens` tokens can hold, without tokenizing it."""
    most = tokenizer.max_chars(tokens)
    if len(text) > most:
        raise UserError(
            f"{what} is {len(text):,} characters, more than the {tokens:,} tokens left in the model's context can "
            f"hold (at most {most:,} characters)"
        )


def check_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")


def prompt_ids(tokenizer: Tokenizer, prompt: str, max_seq_len: int) -> list[int]:
    """A prompt's token ids, with room for at least one new token; an empty prompt starts from
    end-of-text. A prompt that does not fit the context is refused, never silently cut (one far too
    long by its characters alone, before it is tokenized)."""
    check_chars(tokenizer, prompt, "the prompt", max_seq_len - 1)
    ids = tokenizer.encode(check_text(prompt, "the prompt"))
    if not ids and tokenizer.eos_id is not None:
        ids = [tokenizer.eos_id]
    if not ids:
        raise UserError("the prompt is empty and the tokenizer has no end-of-text token to start from")
    return check_fits(ids, max_seq_len, "the prompt")


def check_fits(ids: list[int], context: int, what: str) -> list[int]:
    """`ids`, when they leave room for at least one new token in the model's context; else one line."""
    if len(ids) >= context:
        raise UserError(
            f"{what} is {len(ids)} tokens, but the model's context is {context}: shorten it to at most "
            f"{context - 1} tokens"
        )
    return ids


def fit_new_tokens(ids: list[int], max_new_tokens: int, context: int) -> int:
    """How many new tokens may follow `ids`: max_new_tokens, or what the context has left."""
    return min(max_new_tokens, context - len(ids))


def sample(
    logits: torch.Tensor,
    context: torch.Tensor,
    context_valid: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick the next token from logits (B, vocab) given the tokens so far (B, T)."""
    scores = scaled_scores(logits, context, context_valid, sampling)
    if sampling.temperature == 0:
        return scores.argmax(dim=-1)
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Drop a token once the ones before it already hold top_p of the mass.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs > sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def scaled_scores(
    logits: torch.Tensor, context: torch.Tensor, context_valid: torch.Tensor, sampling: Sampling
) -> torch.Tensor:
    """The logits after the repetition penalty and the temperature, as float32 with the best at 0
    (the raw logits, penalised, for greedy decoding).

    Any finite factor > 0 is applied in float64, where float32 would round it to 0 or inf first
    (1e-300, 1e300) and make a NaN of 0 / 0, inf - inf or 0 x inf. A score past float64 is held at
    its largest finite value; below float32's range the temperature sends a score to -inf, so the
    best token is never lost and a temperature that small samples only among the best."""
    scores = logits.double()
    if sampling.repetition_penalty != 1.0:
        counts = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, context, context_valid.long())
        penalty = sampling.repetition_penalty
        penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
        scores = torch.where(counts > 0, penalised, scores)
    largest = torch.finfo(torch.float64).max
    scores = scores.clamp(-largest, largest)
    if sampling.temperature == 0:
        return scores
    # The largest score moved to 0 first: a tiny temperature then sends the others to -inf, not
    # the largest to +inf (inf - inf = nan in the softmax).
    return ((scores - scores.amax(dim=-1, keepdim=True)) / sampling.temperature).float()


# ---------------------------------------------------------------------------------------------
# The decoding loop


@torch.inference_mode()
def stream(
    model: SmolLM2,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt, one step at a time, as a (B,) tensor.

    Prompts of different lengths are left-padded; a finished row (it produced eos_id) keeps
    yielding eos_id. Without the cache each step recomputes the whole sequence: slower, the
    same tokens, and the reference the tests compare the cache against.
    """
    sampling = sampling or Sampling()
    device = model.embed_tokens.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    total = longest + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt + new tokens = {total} exceeds max_seq_len {model.config.max_seq_len}")
    tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) : longest] = torch.tensor(prompt, device=device)
        valid[row, longest - len(prompt) :] = True
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    unpadded = use_cache and all(len(p) == longest for p in prompts)  # then no mask is needed
    cache = KVCache(model.config, batch, total, device, model.embed_tokens.weight.dtype) if use_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    start, end = 0, longest
    for _ in range(max_new_tokens):
        if unpadded and start > 0:  # one token per row, all at the same position: the inner loop
            logits = model.decode_step(tokens[:, start:end], cache)
        else:
            mask = None if unpadded else padding_mask(valid, start, end)
            logits = model(tokens[:, start:end], positions=positions[:, start:end], mask=mask, cache=cache)
        next_token = sample(logits[:, -1].float(), tokens[:, :end], valid[:, :end], sampling, generator)
        if eos_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
            finished |= next_token == eos_id
        tokens[:, end] = next_token
        yield next_token
        if eos_id is not None and bool(finished.all()):
            return
        start, end = (end if use_cache else 0), end + 1


def generate(model: SmolLM2, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new tokens of every prompt, stopping at (and dropping) eos_id."""
    eos_id = kwargs.get("eos_id")
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in stream(model, prompts, max_new_tokens, **kwargs):
        for row, token in enumerate(step.tolist()):
            if done[row] or token == eos_id:
                done[row] = True
                continue
            outputs[row].append(token)
    return outputs
