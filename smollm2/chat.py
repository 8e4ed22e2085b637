"""Conversations: the chat template, conversations as token ids with their assistant tokens marked,
and chatting with a model (the terminal's `smollm2 chat`, `generate --chat`, the Space's Chat tab).

Templates are rendered the way transformers' `apply_chat_template` renders them: jinja2's immutable
sandbox with trim_blocks and lstrip_blocks, the loopcontrols extension, and the same globals and
filters (raise_exception, strftime_now, a tojson that keeps non-ASCII text), given the messages,
add_generation_prompt and the tokenizer's special tokens. So the same template and messages give
transformers' string exactly (tests/test_chat.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import lru_cache
from typing import TextIO

import jinja2
import jinja2.ext
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smollm2.errors import UserError
from smollm2.generation import Sampling, check_chars, check_new_tokens, check_text
from smollm2.inference import seeded_generator, stream_pieces
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|im_end|>"
IGNORE = -100  # a target the loss skips
Message = dict[str, str]


# ---------------------------------------------------------------------------------------------
# Rendering


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' marker of assistant text) renders its body;
    which tokens are the assistant's is found by rendering prefixes instead (see `encode_conversation`)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; a prompt is not HTML.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"the chat template is not valid jinja (line {exc.lineno}: {exc.message})") from None


def render(tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False) gives it."""
    if not tokenizer.chat_template:
        raise UserError("this model's tokenizer has no chat template (and no <|im_start|>, <|im_end|> tokens)")
    return render_template(tokenizer.chat_template, messages, add_generation_prompt, **tokenizer.special_tokens)


def render_template(template: str, messages: list[Message], add_generation_prompt: bool = False, **tokens: str) -> str:
    try:
        return compile_template(template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **tokens
        )
    except jinja2.TemplateError as exc:
        raise UserError(f"the chat template refused the conversation: {exc}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError) as exc:  # the template's own code failed
        raise UserError(f"the chat template failed on the conversation ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------
# Conversations as tokens


def check_messages(messages: object, where: str) -> list[Message]:
    """A conversation to train on: {"role", "content"} messages, known roles, string contents, a reply."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{where}: \'messages\' must be a non-empty list of {{"role", "content"}} objects')
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {number} needs a string 'content' and a 'role'")
        if message.get("role") not in ROLES:
            raise UserError(
                f"{where}: message {number} has the unknown role {message.get('role')!r} ({', '.join(ROLES)})"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def assistant_spans(tokenizer: Tokenizer, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (reply and end marker).

    A turn's span is what rendering the conversation up to it adds to rendering it up to its
    generation prompt: the text the model must produce at that point, less the newlines that
    follow its end marker (a reply stops at the marker)."""
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
        upto = render(tokenizer, messages[: index + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise UserError("the chat template does not render a conversation turn by turn; it cannot be trained on")
        spans.append((len(prompt), len(upto.rstrip("\n"))))
    return text, spans


def encode_conversation(tokenizer: Tokenizer, messages: list[Message]) -> tuple[list[int], list[bool]]:
    """The conversation's token ids (the rendered text, encoded whole) and, per token, whether it is
    the assistant's: a token counts when it overlaps an assistant span, as transformers'
    return_assistant_tokens_mask counts it."""
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    is_assistant = [any(start < end_span and end > start_span for start_span, end_span in spans)
                    for start, end in encoding.offsets]  # fmt: skip
    return encoding.ids, is_assistant


def training_targets(ids: list[int], is_assistant: list[bool]) -> list[int]:
    """targets[t] = ids[t + 1] where that token is the assistant's, else IGNORE (the last has none)."""
    return [ids[t + 1] if is_assistant[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The token that ends a reply: <|im_end|> where the vocabulary has it, else end-of-text."""
    end = tokenizer.backend.token_to_id(END_OF_TURN)
    return end if end is not None else tokenizer.eos_id


def prompt_ids(tokenizer: Tokenizer, messages: list[Message]) -> list[int]:
    """The conversation so far, then the assistant's turn opened: what a reply continues."""
    return tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True))


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
            encoded[start] = prompt_ids(self.tokenizer, self.system + turns[start:])
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
        still be held by `tokens` tokens (by characters: nothing is rendered or tokenized); the last
        (the new message) at the latest, which the caller measures in tokens."""
        most, total = self.tokenizer.max_chars(tokens), 0
        for index in range(len(starts) - 1, -1, -1):
            end = starts[index + 1] if index + 1 < len(starts) else len(turns)
            total += sum(len(turn["content"]) for turn in turns[starts[index] : end])
            if total > most:
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
    render(
        tokenizer, [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )  # refuse a template-less model now
    generator = seeded_generator(model, seed)
    check_new_tokens(max_new_tokens)
    if system is not None:
        check_text(system, "--system")
    conversation = Conversation(model, tokenizer, system, max_new_tokens)
    context = model.config.max_seq_len
    alone = len(prompt_ids(tokenizer, conversation.system + [{"role": "user", "content": ""}]))
    if alone >= context:
        raise UserError(f"--system is {alone} tokens with the chat template, the model's context is {context}")
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
        try:
            ids, dropped = conversation.prompt(text)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        if dropped:
            print(f"(the {dropped} oldest message(s) were dropped to fit the context)", file=sys.stderr)
        reply = ""
        out.write("assistant> ")
        try:
            budget = min(max_new_tokens, model.config.max_seq_len - len(ids))
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
    ids = prompt_ids(tokenizer, [{"role": "user", "content": check_text(user_text, "the prompt")}])
    context = model.config.max_seq_len
    if len(ids) >= context:
        raise UserError(f"the prompt is {len(ids)} tokens with the chat template, the model's context is {context}")
    generator = seeded_generator(model, seed)
    return stream_reply(model, tokenizer, ids, min(max_new_tokens, context - len(ids)), sampling, generator)


def message_text(content: object) -> str:
    """A chat UI message's text: gradio sends a string, or content blocks ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    blocks = content if isinstance(content, list) else [content]
    return "".join(b.get("text", "") for b in blocks if isinstance(b, dict))


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
    budget = min(max_new_tokens, model.config.max_seq_len - len(ids))
    text = ""
    for piece in stream_reply(model, tokenizer, ids, budget, sampling, seeded_generator(model, seed)):
        text += piece
        yield text
