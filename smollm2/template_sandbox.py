"""The bounded sandbox every template from elsewhere renders in: a chat template (a checkpoint's, a
model folder's: chat_template.py) and lm-eval's task templates (a task file's doc_to_text, doc_to_target,
doc_to_choice, ...: evaluation.py) alike.

`BoundedEnvironment` is jinja2's immutable sandbox (no attribute that leads to Python, no change to the
data a template is given), and a rendering in it is bounded: the text it renders (`RenderBudget.chars`),
everything it makes on the way (values and output: MADE_PER_CHAR times that), the items of one value
counted through the values it repeats (MAX_ITEMS), the size of a number (MAX_INT_BITS), its steps (loop
turns, calls, operators, filters: MAX_STEPS), its time (MAX_SECONDS), its recursion, and the template's
own length (MAX_TEMPLATE_CHARS). A template past a bound is refused in one line (TemplateLimit, a
UserError) that names it as its environment's `subject` does ("the chat template", "a task template"),
before the value that would pass the bound is made. The bounds are hooks of jinja2's own: the sandbox's
intercepted operators and `call`, `finalize`, the filters, and a code generator that counts loop turns and
literal text; ordinary templates render exactly as in a plain sandbox.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MappingView
from contextvars import ContextVar
from dataclasses import dataclass, field

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum

from smollm2.errors import UserError

# ---------------------------------------------------------------------------------------------
# Bounds

MAX_TEMPLATE_CHARS = 1 << 18  # the template itself: published ones are tens of KB; 1 MB took 7 s to compile
# The rendered text, unless a rendering's budget says less (a chat template: what the model's context can
# hold, where it is known); 4 MB of text is about a million tokens.
MAX_RENDER_CHARS = 1 << 22
# Everything one rendering makes (each value an operator, call or filter returns, all output, a macro's
# and a {% set %} block's included), per character it may render: an ordinary template makes a few
# times its text (each `+` of a turn copies it once more), a bomb makes gigabytes.
MADE_PER_CHAR = 16
MAX_STEPS = 1_000_000  # loop turns, calls, operators and filters in one rendering: about a second
MAX_SECONDS = 5.0  # one rendering, whatever its steps
MAX_INT_BITS = 1 << 16  # a number a template computes (10 ** 19728); str() stops at 4,300 digits anyway
# The items one value holds, counted through shared references: `[a, a]` forty times over is small in
# memory, but comparing, hashing or printing it visits 2**40 items in one uninterruptible step.
MAX_ITEMS = 1 << 20
CONTAINERS = (list, tuple, dict, set, frozenset)
SEQUENCES = (str, bytes, list, tuple)
BINOPS = frozenset({"+", "-", "*", "/", "//", "%", "**"})


class TemplateLimit(UserError):
    """A template went past one of its bounds: refused before it goes further."""


class TooLong(TemplateLimit):
    """The rendering is longer than its budget's characters (for a chat: than the model's context can hold)."""


@dataclass
class RenderBudget:
    """What one rendering may still do; `chars` is the text it may render, `context` the model's when
    known; `subject` names the template in the line that refuses it; `seconds` is its time."""

    chars: int
    context: int | None = None
    subject: str = "the template"
    seconds: float = MAX_SECONDS
    steps: int = 0
    made: int = 0
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    @property
    def most(self) -> int:
        return MADE_PER_CHAR * self.chars

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateLimit(
                f"{self.subject} took more than {MAX_STEPS:,} steps (loop turns, calls, operators and filters): refused"
            )
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"{self.subject} took more than {self.seconds:g} s: refused")

    def allow(self, size: int) -> None:
        """Refuse a value of `size` characters or items before it is made, when it would take the
        rendering past what it may make in all."""
        if self.made + size > self.most:
            raise TemplateLimit(
                f"{self.subject} would make a value of {size:,} characters or items, past the {self.most:,} "
                "that one rendering may make here: refused"
            )

    def make(self, size: int) -> None:
        self.allow(size)
        self.made += size

    def remaining(self) -> int:
        return self.most - self.made

    def too_long(self) -> TooLong:
        if self.context is None:
            return TooLong(f"{self.subject} renders more than {self.chars:,} characters, the most it may: refused")
        return TooLong(
            f"{self.subject} renders more than {self.chars:,} characters here, more than the model's context "
            f"of {self.context:,} tokens can hold"
        )


_budget: ContextVar[RenderBudget | None] = ContextVar("the rendering's budget", default=None)


def current_budget() -> RenderBudget:
    budget = _budget.get()
    # None: a template's generate() called outside render_within: each step bounded alone
    return budget if budget is not None else RenderBudget(MAX_RENDER_CHARS)


@contextlib.contextmanager
def within(budget: RenderBudget) -> Iterator[RenderBudget]:
    """`budget` is the one every bound reads for the block (the rendering, or a compilation)."""
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def cutoff() -> int:
    """How far a size needs counting: just past what the rendering may still make."""
    return current_budget().remaining() + 1


def contents(value: object) -> Iterable | None:
    """What a value shows when it is printed, compared or hashed: a container's items (a mapping's keys
    and values, a namespace's attributes); None for a value that holds nothing."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    return list(value) if isinstance(value, MappingView) else None


def measure(value: object, limit: int) -> int:
    """About how long `value` is as text (a string's characters; a container's items with their
    contents, counted through shared references), counted no further than past `limit`."""
    if isinstance(value, (str, bytes)):
        return len(value)
    total, pending = 0, [value]
    while pending and total <= limit:
        item = pending.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 2
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        elif (inside := contents(item)) is not None:
            total += 2 + 2 * len(inside)
            if total <= limit:
                pending.extend(inside)
        else:
            total += 16
    return total


def check_items(value: object) -> object:
    """`value`, refused when it holds more than MAX_ITEMS items counted through shared references."""
    if not isinstance(value, (*CONTAINERS, Namespace)):
        return value
    count, pending = 0, [value]
    while pending:
        item = pending.pop()
        inside = None if isinstance(item, (str, bytes, int, float)) else contents(item)
        if inside is not None:
            count += len(inside)
            if count > MAX_ITEMS:
                subject = current_budget().subject
                raise TemplateLimit(
                    f"{subject} would make a value of more than {MAX_ITEMS:,} items (counted through the values it "
                    "repeats): refused"
                )
            pending.extend(inside)
    return value


def made_size(value: object) -> int:
    """What making `value` cost: a string's characters, a container's items (its contents were made
    before); a container of too many items, or too large a number, is refused."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, CONTAINERS):
        return len(check_items(value))
    if isinstance(value, Namespace):
        check_items(value)
    if isinstance(value, int):
        check_bits(value.bit_length())
        return value.bit_length() // 64
    return 1


def check_bits(bits: int) -> None:
    if bits > MAX_INT_BITS:
        subject = current_budget().subject
        raise TemplateLimit(f"{subject} would make a number of more than {MAX_INT_BITS:,} bits: refused")


def format_size(form: str | bytes, values: Iterable[object], limit: int) -> int:
    """At most how long `form % values`, `form.format(*values)` or the format filter makes: every field
    as wide as the widest number written in `form` or given, or the longest value, plus a float's digits."""
    text = form.decode("latin-1") if isinstance(form, bytes) else str(form)
    numbers = re.findall(r"\d+", text)
    if any(len(number) > 18 for number in numbers):
        return limit + 1
    widths = [int(number) for number in numbers]
    for value in values:
        widths.append(measure(value, limit))
        if isinstance(value, int):
            widths.append(abs(value))
    fields = text.count("%") + text.count("{") + 1
    return len(text) + fields * (max(widths, default=0) + 400)


def operands(right: object) -> Iterable[object]:
    """The values `%` formats: a tuple's items, a mapping's values, else the one value."""
    if isinstance(right, tuple):
        return right
    return right.values() if isinstance(right, Mapping) else (right,)


def binop_size(operator: str, left: object, right: object, limit: int) -> int:
    """At most how much `left operator right` makes, for the operators that can make much more than they are given."""
    if operator == "*":
        if isinstance(left, int) and isinstance(right, SEQUENCES):
            left, right = right, left
        if isinstance(left, SEQUENCES) and isinstance(right, int):
            return len(left) * max(right, 0)
        if isinstance(left, int) and isinstance(right, int):
            check_bits(left.bit_length() + right.bit_length())
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        check_bits(left.bit_length() * right)
    elif operator == "+" and isinstance(left, SEQUENCES) and isinstance(right, SEQUENCES):
        return len(left) + len(right)
    elif operator == "%" and isinstance(left, (str, bytes)):
        return format_size(left, operands(right), limit)
    return 0


# What a method of a str or bytes (or int) makes at most, given the same arguments as the method.
def _widened(text, width, *rest) -> int:
    return max(len(text), width)


def _expanded_tabs(text, tabsize=8) -> int:
    return len(text) + text.count("\t" if isinstance(text, str) else b"\t") * max(tabsize, 0)


def _replaced(text, old, new, count=-1) -> int:
    found = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        found = min(found, count)
    return len(text) + found * len(new)


def _translated(text, table) -> int:
    replacements = table.values() if isinstance(table, Mapping) else ()
    return len(text) * (1 + max((measure(r, cutoff()) for r in replacements), default=0))


def _to_bytes(number, length=1, *rest, **options) -> int:
    return length


METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": _widened,
    "ljust": _widened,
    "rjust": _widened,
    "zfill": _widened,
    "expandtabs": _expanded_tabs,
    "replace": _replaced,
    "translate": _translated,
    "to_bytes": _to_bytes,
}


def method_size(receiver: object, name: str, args: tuple, kwargs: dict, limit: int) -> int:
    if name in ("format", "format_map") and isinstance(receiver, (str, bytes)):
        values = [*args, *kwargs.values()] if name == "format" else [*args[0].values()]
        return format_size(receiver, values, limit)
    if name == "join" and isinstance(receiver, (str, bytes)):
        return joined_size(args[0], receiver, limit)
    sizer = METHOD_SIZES.get(name)
    return sizer(receiver, *args, **kwargs) if sizer else 0


def joined_size(items: list, separator: object, limit: int) -> int:
    total = len(str(separator)) * len(items)
    for item in items:
        total += measure(item, limit)
        if total > limit:
            break
    return total


def lipsum_size(n=5, html=True, min=20, max=100) -> int:  # noqa: A002 (jinja's own names)
    return n * (12 * max + 20)


# What a filter makes at most, given the same arguments as the filter (after its context argument).
def _centered(value, width=80) -> int:
    return max(measure(value, cutoff()), width)


def _indented(text, width=4, first=False, blank=False) -> int:
    text = str(text)
    return len(text) + (text.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))


def _wrapped(text, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True) -> int:
    return (len(text) + 1) * (1 + len(wrapstring or "\n"))


def _replaced_filter(text, old, new, count=None) -> int:
    return _replaced(str(text), str(old), str(new), count)


def _formatted(value, *args, **kwargs) -> int:
    return format_size(value, [*args, *kwargs.values()], cutoff())


def _urlized(value, trim_url_limit=None, nofollow=False, target=None, rel=None, extra_schemes=None) -> int:
    return 3 * len(value) + (len(value) // 2 + 1) * (64 + len(target or "") + len(rel or ""))


def _truncated(text, length=255, killwords=False, end="...", leeway=None) -> int:
    return len(str(text)) + len(end)


def _batched(value, linecount, fill_with=None) -> int:
    return len(value) + linecount


def _sliced(value, slices, fill_with=None) -> int:
    return len(value) + slices


def _joined(value, d="", attribute=None) -> int:
    return joined_size(value, d, cutoff())


def _summed(iterable, attribute=None, start=0) -> int:
    limit = cutoff()
    total = sum(measure(item, limit) for item in iterable) + measure(start, limit)
    return len(iterable) * total if isinstance(start, tuple) else total  # a tuple is copied at every item


def _json_size(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> int:
    step = (indent if isinstance(indent, int) else len(str(indent))) if indent is not None else 0
    per_item = 3 + (sum(len(s) for s in separators) if separators else 2)
    total, pending, limit = 0, [(value, 1)], cutoff()
    while pending and total <= limit:
        item, depth = pending.pop()
        if isinstance(item, str):
            total += 6 * len(item) + 2  # a control character is written \u0000
        elif isinstance(item, (Mapping, list, tuple)):
            children = [*item.keys(), *item.values()] if isinstance(item, Mapping) else list(item)
            total += 2 + len(children) * (per_item + depth * max(step, 0))
            pending.extend((child, depth + 1) for child in children)
        else:
            total += measure(item, limit) + 8
    return total


def _text_of(factor: int) -> Callable[..., int]:
    return lambda value, *args, **kwargs: factor * measure(value, cutoff())


FILTER_SIZES: dict[str, Callable[..., int]] = {
    "center": _centered,
    "indent": _indented,
    "wordwrap": _wrapped,
    "replace": _replaced_filter,
    "format": _formatted,
    "urlize": _urlized,
    "truncate": _truncated,
    "batch": _batched,
    "slice": _sliced,
    "join": _joined,
    "sum": _summed,
    "tojson": _json_size,
    "string": _text_of(1),
    "pprint": _text_of(2),
    "escape": _text_of(6),
    "e": _text_of(6),
    "forceescape": _text_of(6),
    "xmlattr": _text_of(6),
    "urlencode": _text_of(12),
}
LISTED_FIRST = frozenset({"batch", "slice", "join", "sum"})  # their value is looked at before they run


def sized(sizer: Callable[..., int], *args, **kwargs) -> int:
    """A sizer's bound; 0 when the arguments are wrong, which the call itself then says in its own words."""
    try:
        return sizer(*args, **kwargs)
    except (TypeError, ValueError, AttributeError, IndexError, KeyError):
        return 0


def bounded_filter(name: str, function: Callable, sizer: Callable[..., int] | None = None) -> Callable:
    """`function` (the filter `name`) counted as a step, its output bounded before (by `sizer`, given the
    filter's arguments, or FILTER_SIZES' for the name) and counted after."""
    sizer = sizer or FILTER_SIZES.get(name)
    first = 1 if hasattr(function, "jinja_pass_arg") else 0  # the context, eval context or environment

    @functools.wraps(function)
    def bounded(*args, **kwargs):
        budget = current_budget()
        budget.step()
        if name in LISTED_FIRST and len(args) > first and not isinstance(args[first], (list, tuple)):
            args = (*args[:first], list(args[first]), *args[first + 1 :])
        if sizer is not None and len(args) > first:
            budget.allow(sized(sizer, *args[first:], **kwargs))
        result = function(*args, **kwargs)
        budget.make(made_size(result))
        return result

    bounded.unbounded = function
    return bounded


class BoundedCodeGenerator(CodeGenerator):
    """jinja's code generator, but every loop turn (and every item a loop's `if` looks at) is a step,
    and the literal text of every output is counted as made."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        if not getattr(node, "counted", False):
            node.counted = True
            node.body = [nodes.ExprStmt(self.loop_turn(node)), *node.body]
            if node.test is not None:  # loop_turn is None: `or` gives the test's own value
                node.test = nodes.Or(self.loop_turn(node), node.test, lineno=node.lineno)
        super().visit_For(node, frame)

    @staticmethod
    def loop_turn(node: nodes.For) -> nodes.EnvironmentAttribute:
        # `environment.loop_turn`, read: a property, cheaper than a call through the sandbox at every turn
        return nodes.EnvironmentAttribute("loop_turn", lineno=node.lineno)

    def visit_Output(self, node: nodes.Output, frame: Frame) -> None:
        text = sum(len(child.data) for child in node.nodes if isinstance(child, nodes.TemplateData))
        if text:
            self.writeline(f"environment.count_output({text})")
        super().visit_Output(node, frame)

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self.built(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.built(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "store":  # `{% for key, value in ... %}`: names, not a value
            super().visit_Tuple(node, frame)
        else:
            self.built(super().visit_Tuple, node, frame)

    def built(self, visit: Callable, node: nodes.Node, frame: Frame) -> None:
        """A literal [...], {...} or (...), its items counted (environment.built) as it is made."""
        self.write("environment.built(")
        visit(node, frame)
        self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # jinja's own, the parts bounded by environment.joined before they are joined
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.joined({join}, (")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")


@jinja2.pass_context
def counted_output(context: jinja2.runtime.Context, value: object) -> object:
    """Every `{{ ... }}` (jinja's finalize): its text counted as made, before it is made."""
    budget = current_budget()
    budget.make(measure(value, budget.remaining()))
    return value


def bounded_text(pieces: Iterable[str], budget: RenderBudget) -> str:
    """The rendered text, refused (TooLong) as soon as it is longer than the budget's characters."""
    text, length = [], 0
    for piece in pieces:
        length += len(piece)
        if length > budget.chars:
            raise budget.too_long()
        text.append(piece)
    return "".join(text)


def render_within(template: jinja2.Template, variables: Mapping[str, object], budget: RenderBudget) -> str:
    """`template` (of a BoundedEnvironment) rendered with `variables` within `budget`: the same text as
    its render(); a template that recurses without end is one line."""
    with within(budget):
        try:
            return bounded_text(template.generate(**variables), budget)
        except RecursionError:
            raise TemplateLimit(
                f"{budget.subject} recurses too deeply (a macro or loop that calls itself without end): refused"
            ) from None


class BoundedTemplate(jinja2.Template):
    """A template of a BoundedEnvironment: render() renders within a budget of its environment's."""

    def render(self, *args: object, **kwargs: object) -> str:
        return render_within(self, dict(*args, **kwargs), self.environment.budget())


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every arithmetic operator and call a step whose result is bounded, and
    every filter (`add_filters` for those added later). A subclass names its templates (`subject`) and
    the text one rendering may render (`chars`); a caller that knows better gives render_within a budget."""

    code_generator_class = BoundedCodeGenerator
    template_class = BoundedTemplate
    intercepted_binops = BINOPS
    subject = "the template"
    chars = MAX_RENDER_CHARS

    def __init__(self, **options: object) -> None:
        if options.pop("finalize", None) is not None or options.get("enable_async"):
            raise UserError(
                "the bounded template sandbox counts what a template renders in a finalize of its own, rendering "
                "synchronously: it cannot take another finalize, nor async mode"
            )
        super().__init__(**options, finalize=counted_output)
        unbounded, self.filters = self.filters, {}
        self.add_filters(unbounded)

    def add_filters(
        self, filters: Mapping[str, Callable], sizes: Mapping[str, Callable[..., int]] | None = None
    ) -> None:
        """`filters` as this environment's, each bounded (bounded_filter; by `sizes` of its name, where given)."""
        for name, function in filters.items():
            original = getattr(function, "unbounded", function)
            self.filters[name] = bounded_filter(name, original, (sizes or {}).get(name))

    def budget(self) -> RenderBudget:
        return RenderBudget(self.chars, subject=self.subject)

    def from_string(self, source, globals=None, template_class=None) -> jinja2.Template:  # noqa: A002 (jinja's names)
        """The template compiled, once its length is checked; within a budget, since jinja computes constant
        expressions (a filter of literals) as it compiles."""
        if isinstance(source, str) and len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateLimit(
                f"{self.subject} is {len(source):,} characters, more than the {MAX_TEMPLATE_CHARS:,} a template may "
                "have: refused"
            )
        with within(self.budget()):
            try:
                return super().from_string(source, globals, template_class)
            except (RecursionError, SyntaxError, MemoryError):  # Python's own compiler: "too many nested parentheses"
                raise TemplateLimit(f"{self.subject} is nested too deeply to compile: refused") from None

    @property
    def loop_turn(self) -> None:
        """A loop's turn (BoundedCodeGenerator reads it at every one): a step."""
        current_budget().step()

    def count_output(self, chars: int) -> None:
        current_budget().make(chars)

    def built(self, value: object) -> object:
        current_budget().make(made_size(value))
        return value

    def joined(self, join: Callable, parts: tuple) -> str:
        budget = current_budget()
        budget.make(sum(measure(part, budget.remaining()) for part in parts))
        return join(parts)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: object, right: object) -> object:
        budget = current_budget()
        budget.step()
        budget.allow(binop_size(operator, left, right, budget.remaining()))
        result = self.binop_table[operator](left, right)
        budget.make(made_size(result))
        return result

    def call(__self, __context: jinja2.runtime.Context, __obj: object, *args: object, **kwargs: object) -> object:  # noqa: N805 (jinja's signature)
        budget = current_budget()
        budget.step()
        receiver = getattr(__obj, "__self__", None)
        if isinstance(receiver, (str, bytes, int)):
            name = getattr(__obj, "__name__", "")
            if name == "join" and args and not isinstance(args[0], (list, tuple)):
                args = (list(args[0]), *args[1:])
            budget.allow(sized(method_size, receiver, name, args, kwargs, budget.remaining()))
        elif __obj is generate_lorem_ipsum:
            budget.allow(sized(lipsum_size, *args, **kwargs))
        result = super().call(__context, __obj, *args, **kwargs)
        budget.make(made_size(result))
        return result
