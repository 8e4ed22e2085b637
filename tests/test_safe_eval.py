"""What a task file or an `eval --out` may do: a task's templates render in a sandbox (no gadget
reaches Python, whatever the field, wherever the file comes from, with --allow_code too), a metric
HF evaluate would load and a prompt file yaml.full_load would read are code like !function, and a
report is replaced only when it is one eval wrote, unchanged, outside any part of a run, and not a
symlink.

The workspace (tests/conftest.py): a finished 4-step run in run/ with final/, and mine/notes.txt.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import lm_eval
import lm_eval.utils
import pytest
import yaml

from smollm2 import cli, evaluation
from tests.helpers import ROOT, json_task, main_refused, one_error_line, snapshot, tiny_config, train_refused

evaluation.stay_offline()

QUESTIONS = ROOT / "tests" / "eval_tasks" / "multiple_choice.jsonl"
ATTACK = "{{ cycler.__init__.__globals__.os.system('id > PWNED') }}{{q}}"  # the hunt's exact template
REFUSED = "a task template tried what templates may not"
# A command line of its own: this checkout's smollm2, offline (stay_offline set os.environ), no data set bars.
COMMAND_LINE = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture(autouse=True)
def _no_data_set_progress_bars():
    """datasets draws a bar on stderr while it reads a new JSONL file: not a line of ours."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------------
# Templates render in a sandbox


def test_the_hunts_exact_attack_from_the_command_line_is_one_line(workspace):
    """As the user runs it, in a process of its own, with a task that leaves its metric's aggregation
    to lm-eval's default: lm-eval's warnings about that are held, not printed above the refusal."""
    json_task(workspace, doc_to_text=ATTACK, metric_list=[{"metric": "exact_match"}])
    before = snapshot(workspace)
    command = [sys.executable, "-m", "smollm2", "eval", "--model", "run/final", "--tasks", "evil.yaml", "--limit", "2"]
    result = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=300, env=COMMAND_LINE)
    assert REFUSED in one_error_line(result)
    assert not (workspace / "PWNED").exists() and snapshot(workspace) == before


def test_the_hunts_exact_attack_through_eval_runs_nothing(workspace, capsys):
    json_task(workspace, doc_to_text=ATTACK)
    argv = ["eval", "--model", "run/final", "--tasks", "evil.yaml", "--limit", "2"]
    line = main_refused(capsys, workspace, argv, REFUSED)
    assert "(access to attribute '__init__' of 'type' object is unsafe)" in line, line
    assert not (workspace / "PWNED").exists()


MULTIPLE_CHOICE = {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "0"}
MULTIPLE_CHOICE |= {
    "generation_kwargs": None,
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
}
GADGET = "{{ lipsum.__globals__['os'].system('id > PWNED') }}"


@pytest.mark.parametrize(
    ("fields", "flags"),
    [
        ({"doc_to_target": GADGET + "{{a}}"}, []),
        (MULTIPLE_CHOICE | {"doc_to_choice": GADGET + "{{choices}}"}, []),
        (MULTIPLE_CHOICE | {"doc_to_text": "{{ joiner.__init__.__globals__.os.system('id > PWNED') }}"}, []),
        ({"doc_to_text": "{{ ''.__class__.__mro__[1].__subclasses__() }}{{q}}"}, []),
        ({"doc_to_text": ATTACK}, ["--allow_code"]),  # allowed code is !function, never a template
    ],
    ids=["doc_to_target", "doc_to_choice", "multiple_choice_text", "subclasses", "allow_code"],
)
def test_no_gadget_works_through_any_field(workspace, capsys, fields, flags):
    json_task(workspace, **fields)
    argv = ["eval", "--model", "run/final", "--tasks", "evil.yaml", "--limit", "2", *flags]
    main_refused(capsys, workspace, argv, REFUSED)
    assert not (workspace / "PWNED").exists()


def test_a_gadget_in_a_template_rendered_while_requests_are_built_runs_nothing(workspace):
    """gen_prefix renders under lm-eval's progress bar, so this one is called directly."""
    task = json_task(workspace, gen_prefix=GADGET)
    harness = evaluation.SmolLM2Harness.create_from_arg_obj({"model": "run/final"})
    with pytest.raises(evaluation.UserError, match=REFUSED):
        evaluation.run_tasks(harness, evaluation.load_tasks([str(task)]), limit=2)
    assert not (workspace / "PWNED").exists()


def test_a_gadget_in_an_included_file_or_an_include_path_runs_nothing(workspace, capsys):
    json_task(workspace / "tasks", "base.yaml", doc_to_text=ATTACK)
    (workspace / "evil.yaml").write_text("include: tasks/base.yaml\ntask: evil\n")
    argv = ["eval", "--model", "run/final", "--limit", "2"]
    main_refused(capsys, workspace, [*argv, "--tasks", "evil.yaml"], REFUSED)
    main_refused(capsys, workspace, [*argv, "--tasks", "base", "--include_path", "tasks"], REFUSED)
    assert not (workspace / "PWNED").exists()


def test_the_attack_through_train_eval_tasks_runs_nothing(workspace, capsys):
    task = json_task(workspace, doc_to_text=ATTACK)
    config = tiny_config(eval_tasks=[str(task)], eval_every=2, eval_limit=2, save_every=2)
    (workspace / "evil_train.yaml").write_text(yaml.safe_dump(config))
    argv = ["--config", "evil_train.yaml", "--train_steps", "2", "--out_dir", "run2"]
    train_refused(capsys, workspace, argv, REFUSED)
    assert not (workspace / "PWNED").exists()
    assert not (workspace / "run2" / "checkpoints").exists()


def test_a_template_that_names_no_field_of_the_document_is_one_line(workspace, capsys):
    """lm-eval's templates leave no undefined name empty (StrictUndefined): the sandbox keeps that."""
    json_task(workspace, name="typo.yaml", doc_to_text="Question: {{question}}")
    argv = ["eval", "--model", "run/final", "--tasks", "typo.yaml", "--limit", "2"]
    main_refused(capsys, workspace, argv, "'question' is undefined")


ORDINARY = {  # the filters lm-eval's own tasks use (join, length, string, replace, trim), and its regex_replace
    "output_type": "multiple_choice",
    "doc_to_text": "Question: {{question|regex_replace('\\\\s+', ' ')|trim}}\n"
    "Options ({{choices|length}}): {{choices|join(', ')|replace('honey', 'HONEY')}}\n"
    "{% for choice in choices %}{{loop.index}}. {{choice}}\n{% endfor %}Answer:",
    "doc_to_choice": "{{choices}}",
    "doc_to_target": "{{answer|string}}",
    "metric_list": [{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in ("acc", "acc_norm")],
    "generation_kwargs": None,
}


def test_an_ordinary_jinja_task_scores_exactly_as_lm_eval_scores_it(workspace):
    from lm_eval import simple_evaluate

    task = json_task(workspace, name="ordinary.yaml", data=QUESTIONS, **ORDINARY)
    original = lm_eval.utils.env
    harness = evaluation.SmolLM2Harness.create_from_arg_obj({"model": "run/final", "precision": "fp32"})
    tasks = evaluation.load_tasks([str(task)])
    ours = evaluation.run_tasks(harness, tasks, log_samples=True)
    assert lm_eval.utils.env is original  # put back after the evaluation
    theirs = simple_evaluate(  # lm-eval's own rendering, no sandbox
        model=harness,
        tasks=tasks.specs,
        task_manager=tasks.manager,
        log_samples=True,
        bootstrap_iters=1000,
        verbosity="ERROR",
    )
    prompts = sorted((s["doc_id"], s["arguments"], s["resps"]) for s in ours["samples"]["ordinary"])
    assert prompts == sorted((s["doc_id"], s["arguments"], s["resps"]) for s in theirs["samples"]["ordinary"])
    assert len(prompts) == 20 and "Options (4): HONEY, milk, silk, wool\n1. honey\n" in prompts[0][1][0][0]
    assert ours["results"] == theirs["results"]


def test_the_sandbox_is_where_lm_eval_renders_and_is_put_back():
    original = lm_eval.utils.env
    with evaluation.sandboxed_templates():
        assert lm_eval.utils.apply_template("{{ q|regex_replace('a', 'b') }}\n", {"q": "banana"}) == "bbnbnb\n"
        with pytest.raises(
            evaluation.UserError, match=r"\(access to attribute '__init__' of 'type' object is unsafe\)"
        ):
            lm_eval.utils.apply_template("{{ cycler.__init__ }}", {})
        with pytest.raises(evaluation.UserError, match=r"could not be rendered \('missing' is undefined\)"):
            lm_eval.utils.apply_template("{{ missing }}", {})
        with pytest.raises(evaluation.UserError, match="could not be rendered .*: '{{ unclosed'"):
            lm_eval.utils.apply_template("{{ unclosed", {})
    assert lm_eval.utils.env is original


def test_an_lm_eval_that_renders_elsewhere_is_refused_loudly(monkeypatch):
    """If a future lm-eval stops rendering through lm_eval.utils.env, no evaluation runs unsandboxed."""
    monkeypatch.setattr(lm_eval.utils, "apply_template", lambda template, doc: jinja2.Template(template).render(doc))
    with pytest.raises(evaluation.UserError, match="lm_eval.utils.env"), evaluation.sandboxed_templates():
        pass
    monkeypatch.undo()
    monkeypatch.delattr(lm_eval.utils, "env")
    with pytest.raises(evaluation.UserError, match="lm_eval.utils.env"), evaluation.sandboxed_templates():
        pass


def test_lm_eval_builds_its_templates_in_one_place():
    """Every jinja template lm-eval renders comes from lm_eval.utils.env, the one the sandbox replaces:
    a new Environment or Template anywhere else in lm-eval (but its task folders' generator scripts)
    would escape it."""
    root = Path(lm_eval.__file__).parent
    builders = re.compile(r"\b(Environment|Template|SandboxedEnvironment)\(|jinja2\.(Environment|Template|from_string)")
    found = {
        path.relative_to(root).as_posix(): len(builders.findall(path.read_text(encoding="utf-8")))
        for path in root.rglob("*.py")
        if not (path.relative_to(root).parts[0] == "tasks" and len(path.relative_to(root).parts) > 2)
    }
    assert {name: count for name, count in found.items() if count} == {"utils.py": 1}
    renders = re.findall(r"(\w+)\.from_string\(", (root / "utils.py").read_text(encoding="utf-8"))
    assert set(renders) == {"env"}


# ---------------------------------------------------------------------------------------------
# What else in a task file is code: a metric HF evaluate loads, a prompt file yaml.full_load reads


def test_a_metric_loaded_by_hf_evaluate_is_code(workspace, capsys):
    (workspace / "metric").mkdir()
    (workspace / "metric" / "evil.py").write_text("import os\n\nos.system('id > PWNED')\n")
    metric = {"metric": str(workspace / "metric" / "evil.py"), "aggregation": "mean", "higher_is_better": True}
    json_task(workspace, metric_list=[metric])
    argv = ["eval", "--model", "run/final", "--tasks", "evil.yaml", "--limit", "2"]
    main_refused(capsys, workspace, argv, f"runs Python code (metric {metric['metric']}, loaded by HF evaluate)")
    json_task(workspace, metric_list=[{"metric": "exact_match", "hf_evaluate": True}])
    main_refused(capsys, workspace, argv, "runs Python code (metric exact_match, loaded by HF evaluate)")
    assert not (workspace / "PWNED").exists()


def test_a_prompt_file_read_by_yaml_full_load_is_code(workspace, capsys):
    (workspace / "prompts.yaml").write_text(
        "prompts:\n  plain:\n    doc_to_text: '{{q}}'\n    doc_to_target: '{{a}}'\n"
    )
    json_task(workspace, use_prompt="prompts.yaml:plain")
    argv = ["eval", "--model", "run/final", "--tasks", "evil.yaml", "--limit", "2"]
    main_refused(capsys, workspace, argv, "runs Python code (use_prompt prompts.yaml:plain, read with yaml.full_load")


def test_include_path_is_the_folder_it_names_from_where_eval_runs(tmp_path, monkeypatch):
    """lm-eval's index of an --include_path is built once a process: for the folder, not for its name."""
    for name in ("a", "b"):
        json_task(tmp_path / name / "tasks", f"task_{name}.yaml")
    monkeypatch.chdir(tmp_path / "a")
    assert evaluation.load_tasks(["task_a"], "tasks").specs == ["task_a"]
    monkeypatch.chdir(tmp_path / "b")
    assert evaluation.load_tasks(["task_b"], "tasks").specs == ["task_b"]


# ---------------------------------------------------------------------------------------------
# eval --out


TEXT = ["eval", "--model", "run/final", "--text", "mine/notes.txt"]


def write_report(workspace: Path, out: str = "report.json") -> Path:
    assert cli.main([*TEXT, "--out", out]) == 0
    return workspace / out


@pytest.mark.parametrize(
    "edit",
    [
        lambda text: text.replace('"model": ', '"notes": "beats gpt-2 on my laptop",\n  "model": ', 1),
        lambda text: text.replace('"tokens": ', '"tokens":  ', 1),  # a space is a change too
        lambda text: json.dumps(json.loads(text), indent=4),
    ],
    ids=["annotated", "one_space", "reformatted"],
)
def test_a_report_changed_since_eval_wrote_it_is_never_replaced(workspace, capsys, edit):
    report = write_report(workspace)
    report.write_text(edit(report.read_text()))
    main_refused(capsys, workspace, [*TEXT, "--out", "report.json"], "changed since smollm2 wrote it")


def test_an_unchanged_report_or_a_copy_of_one_is_replaced(workspace):
    report = write_report(workspace)
    shutil.copy(report, workspace / "copy.json")
    assert cli.main([*TEXT, "--stride", "1", "--out", "report.json"]) == 0
    assert cli.main([*TEXT, "--stride", "1", "--out", "copy.json"]) == 0
    assert json.loads(report.read_text())["text"]["stride"] == 1
    assert report.read_bytes() == (workspace / "copy.json").read_bytes()


def test_a_report_of_an_older_smollm2_without_its_digest_is_not_replaced(workspace, capsys):
    old = {"format": "smollm2-eval/1", "model": "run/final", "text": {"file": "mine/notes.txt", "tokens": 9}}
    (workspace / "old.json").write_text(json.dumps(old, indent=2) + "\n")
    main_refused(capsys, workspace, [*TEXT, "--out", "old.json"], "exists and is not results smollm2 wrote")


def test_split_val_replaces_its_own_report(workspace):
    argv = ["eval", "--model", "run", "--split", "val", "--out", "split.json"]
    assert cli.main(argv) == 0
    first = (workspace / "split.json").read_bytes()
    assert cli.main([*argv, "--stride", "8"]) == 0
    assert json.loads(first)["split"]["stride"] == 16
    assert json.loads((workspace / "split.json").read_text())["split"]["stride"] == 8


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("run/final/eval.json", "lies inside {}/run/final, a model folder smollm2 wrote"),
        ("run/data/eval.json", "lies inside {}/run/data, a part of the run in {}/run"),
        ("run/data/input-320/eval.json", "lies inside {}/run/data/input-320, a data folder smollm2 wrote"),
        ("run/checkpoints/eval.json", "lies inside {}/run/checkpoints, a part of the run in {}/run"),
        ("run/logs/eval.json", "lies inside {}/run/logs, a part of the run in {}/run"),
    ],
)
def test_a_report_is_never_written_into_a_part_of_a_run(workspace, capsys, out, message):
    message = message.format(workspace.resolve(), workspace.resolve())
    main_refused(capsys, workspace, [*TEXT, "--out", out], f"--out {out} {message}: choose another file")


def test_a_symlink_at_out_is_never_followed_nor_replaced(workspace, capsys):
    write_report(workspace)
    (workspace / "link.json").symlink_to("report.json")
    (workspace / "dangling.json").symlink_to("nowhere/report.json")
    for out in ("link.json", "dangling.json"):
        main_refused(capsys, workspace, [*TEXT, "--out", out], f"--out {out} is a symlink: refusing to replace it")
        assert (workspace / out).is_symlink()
    assert not (workspace / "nowhere").exists()
