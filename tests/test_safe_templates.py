"""One bounded sandbox for every template from elsewhere (smollm2/template_sandbox.py): lm-eval's task
templates (doc_to_text, doc_to_target, doc_to_choice, ...) render in the same bounded environment as
chat templates, with lm-eval's own options, filters, tests and globals, so a task file's template
that would make gigabytes, work without end or recurse is one line with exit code 2, through `eval`
and through train.eval_tasks, while an ordinary task template renders exactly as lm-eval renders it.

Every template here that could eat memory or hang runs in a subprocess under a memory limit
(MEMORY_LIMIT) and a timeout: before the bounds it died there of MemoryError or ran past its timeout.

The workspace (tests/conftest.py): a finished 4-step run in run/ with final/, and mine/notes.txt.
"""

import os
import resource
import subprocess
import sys
from pathlib import Path

import lm_eval.utils
import pytest
import yaml

from smollm2 import evaluation, template_sandbox
from smollm2.errors import UserError
from tests.helpers import ROOT, json_task, leftovers, one_error_line, snapshot, tiny_config

evaluation.stay_offline()

MEMORY_LIMIT = 3 << 30  # address space of a subprocess that renders hostile task templates (torch, lm-eval)
TIMEOUT = 240  # seconds: an unbounded template runs past it; a bounded one is refused in a few
# A command line of its own: this checkout's smollm2, offline (stay_offline set os.environ), no data set bars.
COMMAND_LINE = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
GADGET = "{{ cycler.__init__.__globals__.os.system('id > PWNED') }}"  # after each bomb: nothing runs it


def limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_limited(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=COMMAND_LINE,
                          preexec_fn=limited_memory)  # fmt: skip


def refused_in_a_process(workspace: Path, args: list[str]) -> str:
    """`args` run under MEMORY_LIMIT: exit 2, one line, nothing run, every file as it was, no leftovers,
    and no new file (a run builds its tasks before it prepares its data)."""
    before = snapshot(workspace)
    line = one_error_line(run_limited(args, workspace))
    after = snapshot(workspace)
    assert not (workspace / "PWNED").exists() and not leftovers(workspace)
    assert [name for name, digest in before.items() if after.get(name) != digest] == []
    assert after == before, sorted(after.keys() - before.keys())
    return line


EVAL = [sys.executable, "-m", "smollm2", "eval", "--model", "run/final", "--tasks", "evil.yaml", "--limit", "2"]
STEPS = (
    f"error: a task template took more than {template_sandbox.MAX_STEPS:,} steps (loop turns, calls, operators "
    "and filters): refused"
)
SECONDS = f"error: a task template took more than {template_sandbox.MAX_SECONDS:g} s: refused"


# ---------------------------------------------------------------------------------------------
# Task-template bombs through `eval`, each in a process of its own


BOMBS = {  # (the field, its template, the line's start: a line of its own or one of two)
    "string times": ("doc_to_text", "{{ 'x' * 10**10 }}{{q}}", "error: a task template would make a value of "
                     "10,000,000,000 characters or items, past the "),
    "huge power": ("doc_to_target", "{{ 10 ** (10 ** 8) }}{{a}}", "error: a task template would make a number "
                   f"of more than {template_sandbox.MAX_INT_BITS:,} bits: refused"),
    "nested loops": ("doc_to_text", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}"
                     "{% endfor %}{{q}}", (STEPS, SECONDS)),
    "recursion macro": ("doc_to_text", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}{{q}}",
                        "error: a task template recurses too deeply (a macro or loop that calls itself without "
                        "end): refused"),
    "repeats list": ("doc_to_text", "{% set ns = namespace(a='x', b='x') %}{% for i in range(40) %}"
                     "{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}{{q}}",
                     "error: a task template would make a value of more than "
                     f"{template_sandbox.MAX_ITEMS:,} items (counted through the values it repeats): refused"),
}  # fmt: skip


@pytest.mark.parametrize(("field", "template", "expected"), BOMBS.values(), ids=BOMBS.keys())
def test_a_task_template_bomb_through_eval_is_one_line(workspace, field, template, expected):
    json_task(workspace, **{field: template + GADGET})
    line = refused_in_a_process(workspace, EVAL)
    assert line in expected if isinstance(expected, tuple) else line.startswith(expected), line


def test_a_bomb_in_doc_to_choice_is_one_line(workspace):
    """A multiple-choice task's choices are a template too, rendered for every document."""
    accuracy = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    json_task(workspace, output_type="multiple_choice", doc_to_choice="{{ (choices * 1000000000) }}" + GADGET,
              doc_to_target="0", generation_kwargs=None, metric_list=accuracy)  # fmt: skip
    line = refused_in_a_process(workspace, EVAL)
    assert line.startswith("error: a task template would make a value of 2,000,000,000 characters or items"), line


def test_choices_rendered_too_deep_for_lm_evals_literal_reading_are_one_line(workspace):
    """lm-eval reads a rendered doc_to_choice that looks like a list with ast.literal_eval: 300 brackets
    are past Python's parser (a SyntaxError traceback from inside lm-eval)."""
    accuracy = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
    json_task(workspace, output_type="multiple_choice", doc_to_choice="{{ '[' * 300 }}", doc_to_target="0",
              generation_kwargs=None, metric_list=accuracy)  # fmt: skip
    line = refused_in_a_process(workspace, EVAL)
    assert line.startswith("error: a task template rendered text lm-eval could not read as a Python literal"), line


# ---------------------------------------------------------------------------------------------
# Through train.eval_tasks: refused before the first training step


def test_a_task_template_bomb_through_train_eval_tasks_is_one_line_before_training(workspace):
    task = json_task(workspace, doc_to_text="{{ 'x' * 10**10 }}{{q}}" + GADGET)
    config = tiny_config(eval_tasks=[str(task)], eval_every=2, eval_limit=2, save_every=2)
    (workspace / "evil_train.yaml").write_text(yaml.safe_dump(config))
    train = [sys.executable, str(ROOT / "train.py"), "--config", "evil_train.yaml", "--train_steps", "2"]
    line = refused_in_a_process(workspace, [*train, "--out_dir", "run2"])
    assert line.startswith("error: a task template would make a value of 10,000,000,000 characters or items"), line
    assert not (workspace / "run2" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# The sandbox lm-eval renders in: the bounded one, with lm-eval's settings


def test_lm_eval_renders_in_the_bounded_sandbox_with_its_own_settings():
    original = lm_eval.utils.env
    with evaluation.sandboxed_templates():
        sandbox = lm_eval.utils.env
        assert isinstance(sandbox, template_sandbox.BoundedEnvironment)
        assert sandbox.undefined is original.undefined and sandbox.keep_trailing_newline
        assert set(sandbox.filters) == set(original.filters) and set(sandbox.tests) == set(original.tests)
        assert set(sandbox.globals) == set(original.globals)
    assert lm_eval.utils.env is original


ORDINARY = [  # what lm-eval's own tasks do: fields, filters (its regex_replace), loops, arithmetic, tests
    "Question: {{question|regex_replace('\\\\s+', ' ')|trim}}\nAnswer:",
    "{% for choice in choices %}{{ '%s. %s' % ('ABCD'[loop.index0], choice) }}\n{% endfor %}Answer:",
    "{{ choices|join(', ')|replace('honey', 'HONEY') }} ({{ choices|length }}) {{ answer|string }}{{ answer + 1 }}",
    "{{ [' ', '\\n'][answer % 2] }}{% if answer is even %}even{% else %}odd{% endif %}{{ question.split(' ')[0] }}\n",
    "{{ choices[answer] | upper }} {{ '{}-{}'.format(question[:3], choices|map('title')|join('/')) }}\n\n",
]
DOCUMENT = {"question": "Which  is\tsweet?", "choices": ["honey", "milk", "silk", "wool"], "answer": 2}


def test_an_ordinary_task_template_renders_exactly_as_lm_eval_renders_it():
    expected = [lm_eval.utils.apply_template(template, DOCUMENT) for template in ORDINARY]
    with evaluation.sandboxed_templates():
        assert isinstance(lm_eval.utils.env, template_sandbox.BoundedEnvironment)
        assert [lm_eval.utils.apply_template(template, DOCUMENT) for template in ORDINARY] == expected
    assert expected[0] == "Question: Which is sweet?\nAnswer:"


def rendered(template: str, document: dict | None = None) -> str:
    with evaluation.sandboxed_templates():
        return lm_eval.utils.apply_template(template, document or DOCUMENT)


def test_a_prompt_longer_than_a_task_prompt_may_be_is_refused():
    """Nothing is made past the bound, but the text itself is longer than any prompt lm-eval would keep."""
    long_question = {"question": "x" * 10_000}
    template = "{% for i in range(1000) %}{{ question }}{% endfor %}"
    with pytest.raises(UserError) as refused:
        rendered(template, long_question)
    assert str(refused.value) == (
        f"a task template renders more than {evaluation.MAX_TASK_PROMPT_CHARS:,} characters, the most it may: refused"
    )


def test_lm_evals_regex_replace_is_bounded_before_it_makes_its_text():
    with pytest.raises(UserError, match="^a task template would make a value of 100,101,000 characters or items"):
        rendered("{{ ('x' * 1000) | regex_replace('', 'y' * 100000) }}")
    assert rendered("{{ 'a1b22c333' | regex_replace('[0-9]+', '<\\\\g<0>>') }}") == "a<1>b<22>c<333>"


@pytest.mark.parametrize(
    "template", ["{{ 1 / 0 }}", "{{ question[99] }}", "{{ question + 1 }}", "{{ {'a': 1} | dictsort(by='nope') }}"]
)
def test_a_task_template_whose_own_code_fails_is_one_line(template):
    with pytest.raises(UserError, match=r"^a task template could not be rendered \("):
        rendered(template)


def test_a_task_template_whose_own_code_fails_is_one_line_through_eval(workspace):
    json_task(workspace, doc_to_text="{{ 1 / 0 }}{{q}}" + GADGET)
    line = refused_in_a_process(workspace, EVAL)
    assert line.startswith("error: a task template could not be rendered (ZeroDivisionError"), line


def test_a_task_template_too_long_or_too_deep_to_compile_is_one_line():
    with pytest.raises(UserError, match="^a task template is 262,145 characters, more than the 262,144 a template"):
        rendered("x" * (template_sandbox.MAX_TEMPLATE_CHARS + 1))
    with pytest.raises(UserError, match="^a task template is nested too deeply to compile: refused$"):
        rendered("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")


def test_the_sandbox_imports_nothing_of_smollm2_but_its_errors():
    """A foundation (docs/architecture.md, layer 0): chat templates and task templates both stand on it."""
    source = (ROOT / "smollm2" / "template_sandbox.py").read_text()
    imports = {line.split()[1] for line in source.splitlines() if line.startswith(("from smollm2", "import smollm2"))}
    assert imports == {"smollm2.errors"}
