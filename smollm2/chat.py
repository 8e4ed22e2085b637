"""Chatting with a model: the terminal's `smollm2 chat`, `generate --chat` and the Space's Chat tab.
A conversation is kept within the model's context; its rendering is chat_template.py's."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import TextIO

import torch

from smollm2.chat_template import Message, TemplateLimit, end_of_turn_id, prompt_ids
from smollm2.errors import UserError, one_line
from smollm2.generation import Sampling, check_chars, check_fits, check_new_tokens, check_text, fit_new_tokens
from smollm2.inference import seeded_generator, stream_pieces
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# Replies


def stream_reply(
    model: SmolLM2,
    tokenizer: Tokenizer,
    ids: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """The reply to a prompt (from `prompt_ids`), piece by piece, up to its end-of-turn token (not shown)."""
    return stream_pieces(model, tokenizer, ids, max_new_tokens, sampling, end_of_turn_id(tokenizer), generator)


class Conversation:
    """A chat's history, kept within the model's context: the oldest exchanges are dropped (and said
    so) when the next prompt and room for its reply (reply_tokens) would not fit; a system message
    stays. A message that cannot fit with that room even alone is refused and the history kept."""

    def __init__(self, model: SmolLM2, tokenizer: Tokenizer, system: str | None, reply_tokens: int) -> None:
        self.model, self.tokenizer, self.reply_tokens = model, tokenizer, reply_tokens
        # --system "" is an empty system message (templates add a default one when there is none)
        self.system = [{"role": "system", "content": system}] if system is not None else []
        self.turns: list[Message] = []

    def reset(self) -> None:
        self.turns = []

    def prompt(self, user_text: str) -> tuple[list[int], int]:
        """The ids to continue for this user message, and how many earlier messages were dropped to fit.

        Linear in the history: exchanges that cannot fit by their characters alone go uncounted, then
        a binary search over where the kept history starts renders O(log n) candidates."""
        context, room = self.model.config.max_seq_len, min(self.reply_tokens, self.model.config.max_seq_len - 1)
        check_chars(self.tokenizer, user_text, "the message", context - 1)
        turns = [*self.turns, {"role": "user", "content": check_text(user_text, "the message")}]
        starts = [i for i, turn in enumerate(turns) if i == 0 or turn["role"] == "user"]  # where exchanges begin
        starts = starts[self.first_possible(turns, starts, context - room) :]
        encoded: dict[int, list[int]] = {}

        def fits(start: int) -> bool:
            try:
                encoded[start] = prompt_ids(self.tokenizer, self.system + turns[start:], context)
            except TemplateLimit:  # this much history takes the template past its bounds: it cannot fit
                if start == starts[-1]:
                    raise
                return False
            return len(encoded[start]) + room <= context

        if not fits(starts[-1]):  # a message that cannot fit costs the conversation nothing
            raise UserError(self.no_room(len(encoded[starts[-1]]), context))
        low, high = 0, len(starts) - 1  # starts[high] fits; find the earliest that does
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(starts[middle]) else (middle + 1, high)
        self.turns = turns[starts[high] :]
        return encoded[starts[high]], starts[high]

    def first_possible(self, turns: list[Message], starts: list[int], tokens: int) -> int:
        """The index into `starts` of the earliest exchange whose text, with all after it, could
        still be held by `tokens` tokens (by characters, and by messages: a template that marks turns
        gives each a token at least; nothing is rendered or tokenized); the last (the new message) at
        the latest, which the caller measures in tokens. A history sent to the Space is thus rendered
        no bigger than the context, however many empty messages it holds."""
        most, total, messages = self.tokenizer.max_chars(tokens), 0, 0
        for index in range(len(starts) - 1, -1, -1):
            end = starts[index + 1] if index + 1 < len(starts) else len(turns)
            total += sum(len(turn["content"]) for turn in turns[starts[index] : end])
            messages += end - starts[index]
            if total > most or messages > tokens:
                return min(index + 1, len(starts) - 1)
        return 0

    def no_room(self, tokens: int, context: int) -> str:
        if tokens >= context:
            return f"the message is {tokens} tokens with the template, the model's context is {context}"
        return (
            f"the message is {tokens} tokens with the template: with room for a reply of {self.reply_tokens} tokens "
            f"(max_new_tokens) it does not fit the model's context of {context}; the conversation is kept "
            f"(a shorter message, or max_new_tokens {context - tokens} or less, fits)"
        )

    def answered(self, reply: str) -> None:
        self.turns.append({"role": "assistant", "content": reply})


def chat_loop(
    model: SmolLM2,
    tokenizer: Tokenizer,
    system: str | None,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> None:
    """The terminal chat: a line in, a streamed reply out; /reset forgets, /quit (or end of input) leaves,
    Ctrl-C during a reply stops that reply and keeps the chat."""
    context = model.config.max_seq_len
    prompt_ids(tokenizer, [{"role": "user", "content": "hi"}], context)  # refuse a template-less model now
    generator = seeded_generator(model, seed)
    check_new_tokens(max_new_tokens)
    if system is not None:
        check_text(system, "--system")
    conversation = Conversation(model, tokenizer, system, max_new_tokens)
    system_alone = prompt_ids(tokenizer, conversation.system + [{"role": "user", "content": ""}], context)
    alone = len(check_fits(system_alone, context, "--system with the chat template"))
    if alone + max_new_tokens >= context:  # no message could ever be answered: say so now, not at every one
        raise UserError(
            f"--max_new_tokens {max_new_tokens} leaves no room for a message in the model's context of {context} "
            f"tokens (the chat template alone takes {alone}): use at most {context - alone - 1}"
        )
    print("chat: /reset forgets the conversation, /quit leaves; Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return
        text = line.strip()
        if text == "/quit":
            return
        if text == "/reset":
            conversation.reset()
            print("(the conversation is forgotten)", file=sys.stderr)
            continue
        if not text:
            continue
        if text.startswith("/"):  # a mistyped command ("/quit please", "/exit") is not a message for the model
            print(f"unknown command {text!r}, not sent: the commands are /reset and /quit", file=sys.stderr)
            continue
        try:
            ids, dropped = conversation.prompt(text)
        except UserError as exc:  # a template's raise_exception may say anything: one line
            print(f"error: {one_line(str(exc))}", file=sys.stderr)
            continue
        if dropped:
            print(f"(the {dropped} oldest message(s) were dropped to fit the context)", file=sys.stderr)
        reply = ""
        out.write("assistant> ")
        try:
            budget = fit_new_tokens(ids, max_new_tokens, model.config.max_seq_len)
            for piece in stream_reply(model, tokenizer, ids, budget, sampling, generator):
                reply += piece
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        conversation.answered(reply)


def single_reply(
    model: SmolLM2, tokenizer: Tokenizer, user_text: str, max_new_tokens: int, sampling: Sampling, seed: int = 0
) -> Iterator[str]:
    """`generate --chat`: one user message through the template, the reply streamed."""
    check_new_tokens(max_new_tokens)
    context = model.config.max_seq_len
    ids = prompt_ids(tokenizer, [{"role": "user", "content": check_text(user_text, "the prompt")}], context)
    check_fits(ids, context, "the prompt with the chat template")
    generator = seeded_generator(model, seed)
    return stream_reply(model, tokenizer, ids, fit_new_tokens(ids, max_new_tokens, context), sampling, generator)


def message_text(content: object) -> str:
    """A chat UI message's text: gradio sends a string, or content blocks ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    blocks = content if isinstance(content, list) else [content]
    texts = (b.get("text") for b in blocks if isinstance(b, dict))
    return "".join(text for text in texts if isinstance(text, str))


def reply_after(
    model: SmolLM2,
    tokenizer: Tokenizer,
    history: list[dict],
    message: str,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int = 0,
) -> Iterator[str]:
    """The Space's chat: the reply to `message` after `history` (a chat UI's messages), the whole text
    so far at each step; the oldest exchanges are dropped when the context is full."""
    conversation = Conversation(model, tokenizer, system=None, reply_tokens=max_new_tokens)
    conversation.turns = [
        {"role": m["role"], "content": message_text(m.get("content"))}
        for m in history
        if isinstance(m, dict) and m.get("role") in ("user", "assistant")
    ]
    ids, _ = conversation.prompt(message)
    budget = fit_new_tokens(ids, max_new_tokens, model.config.max_seq_len)
    text = ""
    for piece in stream_reply(model, tokenizer, ids, budget, sampling, seeded_generator(model, seed)):
        text += piece
        yield text
