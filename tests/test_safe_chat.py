"""Chat templates come from elsewhere (a checkpoint's, a model folder's): they are sandboxed and bounded
(what they make, how long they work, how deep they recurse), and a template past a bound is refused in
one line, on the command line, in training and in the Space; the app's error lines are one line.

Every template here that could eat memory runs in a subprocess under a memory limit (MEMORY_LIMIT):
before the bounds it dies there of MemoryError (or runs past its timeout) instead of taking the machine."""

import json
import resource
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
import torch
import yaml

from smollm2 import app, chat, chat_template, cli
from smollm2.errors import UserError
from smollm2.generation import Sampling
from smollm2.hf import write_model_folder
from smollm2.model import SmolLM2
from smollm2.tokenizer import CHATML_TEMPLATE, load_tokenizer, train_tokenizer
from tests.conftest import small_config
from tests.helpers import ROOT, leftovers, main_refused, one_error_line, snapshot, tiny_config

MEMORY_LIMIT = 2 << 30  # address space of a subprocess that renders a hostile template
HI = [{"role": "user", "content": "hi"}]

RENDER = """
import sys
from smollm2.chat_template import render_template
from smollm2.errors import UserError, one_line
try:
    text = render_template(sys.argv[1], [{"role": "user", "content": "hi"}], True)
except UserError as exc:
    print(f"error: {one_line(str(exc))}", file=sys.stderr)
    raise SystemExit(2)
print(len(text))
"""


def limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_limited(args: list[str], cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limited_memory)  # fmt: skip


def render_limited(template: str, tmp_path: Path, timeout: int = 30) -> subprocess.CompletedProcess:
    return run_limited(["-c", RENDER, template], tmp_path, timeout)


@pytest.fixture(scope="module")
def tokenizer():
    lines = (ROOT / "examples" / "conversations.jsonl").read_text().splitlines()[:300]
    texts = [chat_template.render_template(CHATML_TEMPLATE, json.loads(line)["messages"]) for line in lines]
    return train_tokenizer(texts, 400)


@pytest.fixture
def model_folder(tmp_path, tokenizer):
    """A model folder whose chat_template.jinja is the given template."""

    def made(template: str, name: str = "model") -> Path:
        folder = tmp_path / name
        write_model_folder(SmolLM2(small_config(vocab_size=400, max_seq_len=96)), folder, tokenizer)
        (folder / "chat_template.jinja").write_text(template)
        return folder

    return made


# ---------------------------------------------------------------------------------------------
# What a template may make: bounded before it is made


def test_a_checkpoint_whose_template_multiplies_a_string_is_one_line_not_gigabytes(workspace):
    """The finding: `{{ messages[0].content * 1000000000 }}` grew `generate --chat` to 23 GB."""
    state = torch.load(workspace / "run" / "checkpoints" / "step_4.pt", weights_only=True)
    state["chat_template"] = "{{ messages[0].content * 1000000000 }}"
    torch.save(state, workspace / "mine" / "hostile.pt")
    before = snapshot(workspace)
    result = run_limited(["-m", "smollm2", "generate", "--checkpoint", "mine/hostile.pt", "--chat", "--prompt", "hi",
                          "--max_new_tokens", "2", "--precision", "fp32"], workspace)  # fmt: skip
    line = one_error_line(result)
    assert line.startswith("error: the chat template would make a value of 2,000,000,000 characters or items, past ")
    assert line.endswith(" that one rendering may make here: refused"), line
    assert snapshot(workspace) == before and not leftovers(workspace)


BOMBS = {
    "string times": "{{ messages[0].content * 1000000000 }}",
    "list times": "{{ (messages * 300000000) | length }}",
    "plus doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "tilde doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "a method's width": "{{ 'x'.center(1000000000) }}",
    "a filter's width": "{{ 'x' | center(1000000000) }}",
    "indent": "{{ 'x' | indent(1000000000, first=True) }}",
    "replace": "{{ ('x' * 100000).replace('', 'y' * 100000) }}",
    "expandtabs": "{{ ('\\t' * 100000).expandtabs(100000) }}",
    "str.format width": "{{ '{:>1000000000}'.format(1) }}",
    "percent width": "{{ '%1000000000d' % 1 }}",
    "format filter width": "{{ '%1000000000d' | format(1) }}",
    "join": "{{ (['x' * 100000] * 100000) | join }}",
    "str.join": "{{ ''.join(['x' * 100000] * 100000) }}",
    "a list shown": "{{ ['x' * 1000000] * 100000 }}",
    "many made": "{{ (range(100000) | map('center', 100000) | list) | length }}",
    "a macro's buffer": "{% macro m() %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}{% endmacro %}"
    "{{ m() | length }}",
    "literal text in a loop": "{% macro m() %}{% for i in range(100000) %}" + "x" * 30000 + "{% endfor %}"
    "{% endmacro %}{{ m() | length }}",
    "tojson indent": "{{ (range(100000) | list) | tojson(indent=100000) }}",
    "lipsum": "{{ lipsum(100000, max=100000) | length }}",
    "to_bytes": "{{ (1).to_bytes(1500000000, 'big') | length }}",
}


@pytest.mark.parametrize("template", BOMBS.values(), ids=BOMBS.keys())
def test_a_template_that_would_make_too_much_is_refused_before_it_is_made(template, tmp_path):
    line = one_error_line(render_limited(template, tmp_path))
    assert line.startswith("error: the chat template would make "), line


# ---------------------------------------------------------------------------------------------
# How long a template may work: steps and time


WORK = {
    "nested ranges": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "a macro's fan-out": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "a recursive loop": "{% for x in range(10) recursive %}{{ loop(range(10)) if loop.depth < 30 }}{% endfor %}",
}


@pytest.mark.parametrize("template", WORK.values(), ids=WORK.keys())
def test_a_template_that_works_without_end_is_refused_after_its_steps(template, tmp_path):
    """The steps stop it (in about a second); on a machine slow enough, the clock first."""
    line = one_error_line(render_limited(template, tmp_path))
    assert line in (
        f"error: the chat template took more than {chat_template.MAX_STEPS:,} steps (loop turns, calls, operators "
        "and filters): refused",
        f"error: the chat template took more than {chat_template.MAX_SECONDS:g} s: refused",
    ), line


REPEATS = {
    "compared": "{% set ns = namespace(a='x', b='x') %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}"
    "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
    "hashed": "{% set ns = namespace(a='x') %}{% for i in range(40) %}{% set ns.a = (ns.a, ns.a) %}{% endfor %}"
    "{{ {ns.a: 1} | length }}",
    "printed": "{% set ns = namespace(a='x') %}{% for i in range(30) %}{% set ns.b = ns.a %}"
    "{% set ns.a = namespace(x=ns.b, y=ns.b) %}{% endfor %}{{ ns }}",
}


@pytest.mark.parametrize("template", REPEATS.values(), ids=REPEATS.keys())
def test_a_value_of_repeats_is_refused_before_one_step_visits_them_all(template, tmp_path):
    """Forty doublings of [a, a] hold 80 references, but comparing, hashing or printing them is 2**40 visits."""
    line = one_error_line(render_limited(template, tmp_path))
    assert line == (
        f"error: the chat template would make a value of more than {chat_template.MAX_ITEMS:,} items (counted "
        "through the values it repeats): refused"
    ), line


def test_a_huge_power_is_refused_before_it_is_computed(tmp_path):
    line = one_error_line(render_limited("{{ 10 ** (10 ** 8) }}", tmp_path))
    assert line.startswith("error: the chat template would make a number of more than "), line


def test_a_template_whose_steps_are_slow_is_stopped_by_the_clock(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.2)
    slow = "{% set big = messages[0].content * 1000000 %}{% for i in range(100000) %}{{ 'y' in big }}{% endfor %}"
    with pytest.raises(UserError, match=r"^the chat template took more than 0.2 s: refused$"):
        chat_template.render_template(slow, HI)


def test_a_template_that_recurses_without_end_is_one_line(model_folder, tmp_path, capsys):
    """TB-2: a RecursionError traceback."""
    folder = model_folder("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}")
    argv = ["generate", "--model", str(folder), "--chat", "--prompt", "hi", "--max_new_tokens", "2"]
    main_refused(capsys, tmp_path, argv, "the chat template recurses too deeply (a macro or loop that calls itself")


def test_a_template_nested_too_deeply_to_compile_is_one_line():
    with pytest.raises(UserError, match="^the chat template is nested too deeply to compile"):
        chat_template.render_template("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", HI)


def test_a_template_longer_than_any_chat_template_is_refused():
    template = "x" * (chat_template.MAX_TEMPLATE_CHARS + 1)
    with pytest.raises(UserError, match=f"^the chat template is {len(template):,} characters, more than the "):
        chat_template.render_template(template, HI)


def test_ordinary_templates_keep_within_the_bounds_and_render_as_before(tokenizer):
    """The bounds change nothing for what templates do: loops, macros, filters, format, ~ and +."""
    template = (
        "{% macro turn(m) %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endmacro %}"
        "{% for m in messages %}{{ turn(m) }}{% endfor %}{{ '%d/%s' % (messages | length, 'x' * 3) }}"
        "{{ '{}-{:>4}'.format(1, 2) ~ ([1, 2] + [3]) | join(',') }}{{ messages | tojson(indent=2) | length }}"
        "{{ 2 ** 10 }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversation = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "ho"}]
    expected = (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nho<|im_end|>\n2/xxx1-   21,2,3"
        f"{len(json.dumps(conversation, indent=2))}1024<|im_start|>assistant\n"
    )
    assert chat_template.render_template(template, conversation, True) == expected


# ---------------------------------------------------------------------------------------------
# How long the rendered text may be: what the model's context can hold


def test_a_rendering_longer_than_the_context_can_hold_is_refused(model_folder, tmp_path, capsys):
    folder = model_folder("{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}")
    argv = ["generate", "--model", str(folder), "--chat", "--prompt", "hi", "--max_new_tokens", "2"]
    err = main_refused(capsys, tmp_path, argv, "the chat template renders more than ")
    assert err.endswith("characters here, more than the model's context of 96 tokens can hold"), err


def test_a_history_of_more_messages_than_the_context_has_tokens_is_not_rendered_whole(tokenizer, monkeypatch):
    """The Space's chat gets its history from the request: 100,000 empty messages are not all rendered
    (each kept message takes a token at least), and the oldest are dropped as ever."""
    model = SmolLM2(small_config(vocab_size=400, max_seq_len=96))
    rendered = []
    real_prompt_ids = chat.prompt_ids
    monkeypatch.setattr(chat, "prompt_ids", lambda tok, messages, *a, **k: rendered.append(len(messages))
                        or real_prompt_ids(tok, messages, *a, **k))  # fmt: skip
    conversation = chat.Conversation(model, tokenizer, system=None, reply_tokens=8)
    conversation.turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}] * 50_000
    ids, dropped = conversation.prompt("hi")
    assert max(rendered) <= 96 - 8 and len(ids) + 8 <= 96 and dropped == 100_000 - len(conversation.turns) + 1


# ---------------------------------------------------------------------------------------------
# A template that renders nothing (TB-3)


NOTHING = "{% for m in messages %}{% endfor %}"


def test_a_template_that_renders_nothing_is_one_line_for_generate_and_chat(model_folder, tmp_path, capsys):
    folder = model_folder(NOTHING)
    message = "the chat template renders the conversation as no tokens at all"
    main_refused(capsys, tmp_path, ["generate", "--model", str(folder), "--chat", "--prompt", "hi"], message)
    result = subprocess.run([sys.executable, "-m", "smollm2", "chat", "--model", str(folder)], input="hi\n/quit\n",
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert message in one_error_line(result)


@pytest.fixture
def chat_run(tmp_path, monkeypatch, model_folder):
    """chats.jsonl and a chat config whose tokenizer is a model folder's (and its template)."""
    lines = (ROOT / "examples" / "conversations.jsonl").read_text().splitlines()[:100]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)

    def config(template: str) -> Path:
        folder = model_folder(template, "tok")
        settings = tiny_config(prompts=["What is 2 plus 3?"], predict_every=2)
        settings["model"] |= {"max_seq_len": 96, "vocab_size": 400}
        settings["data"] = {"path": "chats.jsonl", "format": "chat", "seq_len": 96, "val_fraction": 0.1,
                            "tokenizer": str(folder)}  # fmt: skip
        (tmp_path / "chat.yaml").write_text(yaml.safe_dump(settings))
        return tmp_path / "chat.yaml"

    return config


@pytest.mark.parametrize(
    ("template", "message"),
    [(NOTHING, "the chat template renders the conversation as no tokens at all"),
     ("{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}",
      "the chat template renders none of the assistant's text of the conversation")],
)  # fmt: skip
def test_a_training_run_refuses_such_a_template_before_it_trains(chat_run, tmp_path, capsys, template, message):
    chat_run(template)
    argv = ["--config", "chat.yaml", "--train_steps", "4", "--out_dir", "run"]
    before = snapshot(tmp_path)
    assert cli.train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err
    assert snapshot(tmp_path) == before and not (tmp_path / "run" / "checkpoints").exists()


def test_predictions_refuse_a_template_that_renders_a_prompt_as_nothing(chat_run, tmp_path, capsys):
    """The conversations render (a reply's text), but a prediction's prompt is nothing: refused at the start."""
    chat_run("{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}<|im_end|>{% endif %}{% endfor %}")
    assert cli.train_main(["--config", "chat.yaml", "--train_steps", "4", "--out_dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the chat template renders the conversation as no tokens at all" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# The app: its errors are one line (COS-2), its requests bounded


def test_the_app_escapes_a_newline_in_a_path_it_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        app.main(["--model", str(tmp_path / "no\nmodel")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2, err
    assert err == f"error: {tmp_path}/no\\nmodel: no model there (run `make demo` first, or pass --model)\n"


def test_the_app_escapes_a_model_it_cannot_load(tmp_path, capsys):
    (tmp_path / "bad\nfolder").mkdir()
    (tmp_path / "bad\nfolder" / "config.json").write_text("{")
    with pytest.raises(SystemExit) as stopped:
        app.main(["--model", str(tmp_path / "bad\nfolder")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.splitlines()) == 1 and "bad\\nfolder" in err, err


def test_the_app_refuses_a_template_that_fails_at_the_start(model_folder, capsys, monkeypatch):
    monkeypatch.setattr(gr.Blocks, "launch", lambda *args, **kwargs: pytest.fail("the app was served"))
    folder = model_folder("{{ raise_exception('two\nlines \x1b[31mred') }}")
    with pytest.raises(SystemExit) as stopped:
        app.main(["--model", str(folder)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err == (
        "error: the chat template refused the conversation: two\\nlines \\x1b[31mred\n"
    ), err


def test_the_chat_tab_shows_a_template_error_in_one_line(model_folder, tokenizer):
    folder = model_folder(
        "{% if messages[-1]['content'] == 'boom' %}{{ raise_exception('two\nlines') }}{% endif %}" + CHATML_TEMPLATE
    )
    model = SmolLM2(small_config(vocab_size=400, max_seq_len=96))
    respond = app.chat_responder(model, load_tokenizer(folder))
    with pytest.raises(gr.Error) as shown:
        list(respond("boom", [], 8, 0.0))
    assert shown.value.message == "the chat template refused the conversation: two\\nlines"


def test_the_app_refuses_more_new_tokens_than_its_slider_allows(tokenizer):
    """An API call skips the slider: a request asks for no more work than the browser allows."""
    model = SmolLM2(small_config(vocab_size=400, max_seq_len=96))
    with pytest.raises(gr.Error) as refused_chat:
        list(app.chat_responder(model, tokenizer)("hi", [], 100000, 0.0))
    assert refused_chat.value.message == "max_new_tokens must be in 1..95, got 100000"
    with pytest.raises(gr.Error) as refused_generate:
        list(app.generator(model, tokenizer)("hi", 0, 0.8, 50, 1.0, 0))
    assert refused_generate.value.message == "max_new_tokens must be in 1..95, got 0"


def test_the_chat_tab_refuses_a_history_that_is_not_a_list(tokenizer):
    model = SmolLM2(small_config(vocab_size=400, max_seq_len=96))
    with pytest.raises(gr.Error) as refused_history:
        list(app.chat_responder(model, tokenizer)("hi", 5, 8, 0.0))
    assert refused_history.value.message == "the history must be a list of messages"


# ---------------------------------------------------------------------------------------------
# The terminal chat's errors: one line, of a length to read


def test_the_terminal_chat_shows_a_template_error_in_one_line(tokenizer, capsys):
    template = "{% if messages[-1]['content'] == 'boom' %}{{ raise_exception('two\nlines') }}{% endif %}"
    model = SmolLM2(small_config(vocab_size=400, max_seq_len=96))
    typed = ["boom"]

    def read(prompt: str) -> str:
        if not typed:
            raise EOFError
        return typed.pop(0)

    with_template = type(tokenizer)(tokenizer.backend, chat_template=template + CHATML_TEMPLATE)
    chat.chat_loop(model, with_template, None, 4, Sampling(temperature=0), read=read)
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("chat: ")]
    assert errors == ["error: the chat template refused the conversation: two\\nlines"]


def test_a_template_error_is_cut_to_a_line_that_can_be_read():
    with pytest.raises(UserError) as refused_long:
        chat_template.render_template("{{ raise_exception('word ' * 100000) }}", HI)
    said = str(refused_long.value)
    assert said.startswith("the chat template refused the conversation: word word ") and said.endswith(" ...")
    assert len(said) == len("the chat template refused the conversation: ") + chat_template.MAX_SAID + len(" ...")
