"""The chat template, and conversations as token ids with their assistant tokens marked (what
fine-tuning trains on and what a chat prompt is). Chatting with a model is chat.py's.

Templates are rendered the way transformers' `apply_chat_template` renders them: jinja2's immutable
sandbox with trim_blocks and lstrip_blocks, the loopcontrols extension, and the same globals and
filters (raise_exception, strftime_now, a tojson that keeps non-ASCII text), given the messages,
add_generation_prompt and the tokenizer's special tokens. So the same template and messages give
transformers' string exactly (tests/test_chat.py).

A template comes from elsewhere (a checkpoint, a downloaded model folder), so it renders in the bounded
sandbox of template_sandbox.py, as lm-eval's task templates do: the text it renders (here: what the
model's context can hold), everything it makes on the way (values and output), its steps (loop turns,
calls, operators, filters), its time and its recursion. A template past a bound is refused in one line
(TemplateLimit), before the value that would pass it is made.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext

from smollm2.errors import UserError
from smollm2.template_sandbox import (  # noqa: F401 - its bounds and TemplateLimit are the chat template's names too
    MAX_ITEMS,
    MAX_RENDER_CHARS,
    MAX_SECONDS,
    MAX_STEPS,
    MAX_TEMPLATE_CHARS,
    BoundedEnvironment,
    RenderBudget,
    TemplateLimit,
    current_budget,
    format_size,
    render_within,
)
from smollm2.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|im_end|>"
IGNORE = -100  # a target the loss skips
Message = dict[str, str]
NOTHING_RENDERED = "the chat template renders the conversation as no tokens at all: nothing to continue or learn from"
MAX_SAID = 500  # characters of a template's own error message in the line that refuses it
CHAT_TEMPLATE = "the chat template"  # how a refusal names it


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


def _strftime_now(format: str) -> str:  # noqa: A002 (transformers' name)
    budget = current_budget()
    budget.allow(format_size(format, (), budget.remaining()))  # glibc takes widths: %1000000000Y
    return datetime.now().strftime(format)


class ChatTemplates(BoundedEnvironment):
    """The bounded sandbox, named for the chat template in the lines that refuse one."""

    subject = CHAT_TEMPLATE


@lru_cache(maxsize=8)
def compile_template(template: str) -> jinja2.Template:
    environment = ChatTemplates(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.add_filters({"tojson": _tojson})
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"the chat template is not valid jinja (line {exc.lineno}: {exc.message})") from None


def render(
    tokenizer: Tokenizer, messages: list[Message], add_generation_prompt: bool = False, context: int | None = None
) -> str:
    """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False) gives it;
    with the model's `context`, no longer than that many tokens can hold (TooLong)."""
    if not tokenizer.chat_template:
        raise UserError("this model's tokenizer has no chat template (and no <|im_start|>, <|im_end|> tokens)")
    budget = chat_budget(min(tokenizer.max_chars(context), MAX_RENDER_CHARS), context) if context else None
    return render_template(
        tokenizer.chat_template, messages, add_generation_prompt, budget=budget, **tokenizer.special_tokens
    )


def render_template(
    template: str,
    messages: list[Message],
    add_generation_prompt: bool = False,
    *,
    budget: RenderBudget | None = None,
    **tokens: str,
) -> str:
    """`template` rendered within `budget` (by default: MAX_RENDER_CHARS, the model's context unknown)."""
    compiled = compile_template(template)
    variables = dict(messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt)
    try:
        return render_within(compiled, variables | tokens, budget or chat_budget(MAX_RENDER_CHARS))
    except jinja2.TemplateError as exc:
        raise UserError(f"the chat template refused the conversation: {said(exc)}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError) as exc:  # the template's own code failed
        raise UserError(f"the chat template failed on the conversation ({type(exc).__name__}: {said(exc)})") from None


def chat_budget(chars: int, context: int | None = None) -> RenderBudget:
    return RenderBudget(chars, context, CHAT_TEMPLATE, MAX_SECONDS)


def said(exc: Exception) -> str:
    """What a template's error says (its raise_exception's words, a key it missed), at most MAX_SAID characters."""
    text = str(exc)
    return text if len(text) <= MAX_SAID else text[:MAX_SAID] + " ..."


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
    if not encoding.ids:
        raise UserError(NOTHING_RENDERED)
    is_assistant = [any(start < end_span and end > start_span for start_span, end_span in spans)
                    for start, end in encoding.offsets]  # fmt: skip
    if not any(is_assistant):  # every conversation has a reply; its end marker at least is text
        raise UserError(
            "the chat template renders none of the assistant's text of the conversation: nothing to learn from"
        )
    return encoding.ids, is_assistant


def training_targets(ids: list[int], is_assistant: list[bool]) -> list[int]:
    """targets[t] = ids[t + 1] where that token is the assistant's, else IGNORE (the last has none)."""
    return [ids[t + 1] if is_assistant[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The token that ends a reply: <|im_end|> where the vocabulary has it, else end-of-text."""
    end = tokenizer.backend.token_to_id(END_OF_TURN)
    return end if end is not None else tokenizer.eos_id


def prompt_ids(tokenizer: Tokenizer, messages: list[Message], context: int | None = None) -> list[int]:
    """The conversation so far, then the assistant's turn opened: what a reply continues (rendered no
    longer than the model's `context` can hold, where given)."""
    ids = tokenizer.encode(render(tokenizer, messages, add_generation_prompt=True, context=context))
    if not ids:  # generation needs a token to continue; refused here, not at the first reply
        raise UserError(NOTHING_RENDERED)
    return ids
