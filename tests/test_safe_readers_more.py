"""More files from elsewhere, and a resume that must say what changed. Whatever a marker, a prepared
folder's meta.json, a corpus line, the decode-choices cache, a Space's run.json, metrics.jsonl or a
task YAML holds, a command ends in one line (exit 2) or, where an unreadable file means "absent",
treats it as such; a refused init_from or optimizer state writes nothing; a resume on data that
changed says so. The workspace (tests/conftest.py): a finished 4-step run in run/ (checkpoints at
2 and 4, final/, logs/), its config in config/tiny.yaml, a user's folder mine/.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smollm2 import cli
from tests.helpers import ROOT, json_task, main_refused, one_error_line, train_refused

TRAIN = ["--config", "config/tiny.yaml"]
CHECKPOINT = "run/checkpoints/step_4.pt"
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit
HUGE = "1" * 5000  # past Python's 4300 digits for converting text to an int: a ValueError, not a JSONDecodeError


def entries(folder: Path) -> set[str]:
    """Every file and folder under `folder`, by relative path."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def prepared(workspace: Path) -> Path:
    return next((workspace / "run" / "data").iterdir())


# ---------------------------------------------------------------------------------------------
# Markers and meta.json: unreadable means "not ours", never a crash


def test_a_marker_nested_too_deeply_is_not_ours(workspace, capsys):
    (workspace / "mine" / ".smollm2").write_text(DEEP)
    argv = ["export", "--checkpoint", CHECKPOINT, "--out", "mine"]
    main_refused(capsys, workspace, argv, "mine holds files smollm2 did not write (notes.txt)")


def test_a_marker_nested_too_deeply_reads_as_no_marker(tmp_path):
    from smollm2.files import read_marker, staging_token_of

    (tmp_path / ".smollm2").write_text(DEEP)
    (tmp_path / ".smollm2-staging").write_text(DEEP)
    assert read_marker(tmp_path) == {}
    assert staging_token_of(tmp_path) is None


def test_a_meta_json_nested_too_deeply_is_refused_not_rebuilt(workspace, capsys):
    (prepared(workspace) / "meta.json").write_text(DEEP)
    argv = ["prepare", *TRAIN, "--out_dir", "run"]
    main_refused(capsys, workspace, argv, "(meta.json, changed since smollm2 wrote it)")


@pytest.mark.parametrize(
    "change",
    [{"dtype": "float16"}, {"dtype": "V2"}],
    ids=["float_tokens", "void_tokens"],
)
def test_a_meta_json_of_other_types_is_no_prepared_corpus(workspace, capsys, change):
    """eval --split val read the tokens as floats or raw bytes: a TypeError in decode."""
    meta = prepared(workspace) / "meta.json"
    meta.write_text(json.dumps(json.loads(meta.read_text()) | change))
    argv = ["eval", "--model", "run/final", "--split", "val"]
    main_refused(capsys, workspace, argv, "--split val: run/data holds no prepared corpus; give --text FILE instead")


# ---------------------------------------------------------------------------------------------
# A corpus or conversations line: one line naming the file and line


CONVERSATION = {"text": "fine", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize(
    ("line", "reason"),
    [(DEEP, "nested too deeply"), ('{"text": ' + HUGE + "}", "Exceeds the limit (4300 digits)")],
    ids=["deep", "huge_number"],
)
@pytest.mark.parametrize("data_format", ["text", "chat"])
def test_a_hostile_jsonl_line_is_one_line(workspace, capsys, line, reason, data_format):
    (workspace / "corpus.jsonl").write_text(json.dumps(CONVERSATION) + "\n" + line + "\n")
    settings = ["--set", "data.path=corpus.jsonl", f"data.format={data_format}"]
    argv = [*TRAIN, *settings, "--train_steps", "1", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, f"corpus.jsonl:2: not valid JSON ({reason}")
    assert not (workspace / "fresh").exists()


# ---------------------------------------------------------------------------------------------
# Caches and the files a Space and the app read: unreadable means nothing remembered


def test_a_decode_choices_file_nested_too_deeply_is_nothing_remembered_and_left_alone(workspace, capsys):
    from smollm2.hardware import read_decode_choices

    choices = Path(os.environ["SMOLLM2_DECODE_CHOICES"])
    choices.write_text(DEEP)
    assert read_decode_choices(choices) is None
    argv = ["generate", "--model", "run/final", "--prompt", "ROMEO:", "--max_new_tokens", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert choices.read_text() == DEEP


def test_a_run_json_nested_too_deeply_is_no_facts(tmp_path):
    from smollm2.space import NEUTRAL_PROMPT, opening_prompt, read_run_file

    (tmp_path / "model").mkdir()
    (tmp_path / "run.json").write_text('{"name": "x", "prompts": ' + DEEP + "}")
    assert read_run_file(tmp_path / "run.json") is None
    assert opening_prompt(tmp_path / "model") == NEUTRAL_PROMPT


def test_metrics_lines_nested_too_deeply_or_with_huge_numbers_are_not_rows(workspace, capsys):
    from smollm2.metrics import read_metrics

    metrics = workspace / "run" / "logs" / "metrics.jsonl"
    rows = read_metrics(metrics)
    metrics.write_text(metrics.read_text() + DEEP + "\n" + '{"step": ' + HUGE + "}\n")
    assert read_metrics(metrics) == rows
    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0, capsys.readouterr().err
    argv = [*TRAIN, "--train_steps", "1", "--checkpoint_path", CHECKPOINT, "--out_dir", "run"]
    assert cli.train_main(argv) == 0, capsys.readouterr().err
    assert [row["step"] for row in read_metrics(metrics)] == [1, 2, 3, 4, 5]


def test_an_eval_out_nested_too_deeply_is_not_a_report_of_ours(workspace, capsys):
    (workspace / "report.json").write_text(DEEP)
    argv = ["eval", "--model", "run/final", "--text", "input.txt", "--out", "report.json"]
    main_refused(capsys, workspace, argv, "report.json exists and is not results smollm2 wrote")


# ---------------------------------------------------------------------------------------------
# Task YAML: nested too deeply, an alias bomb, an alias inside itself


def bomb(levels: int = 9) -> str:
    """Billion laughs: each level nine aliases of the one before; 9**9 values once expanded."""
    lines = ["task: bomb", 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


def chain(links: int = 5000) -> str:
    """Aliases nesting each the one before: no deep text, yet 5000 levels once read."""
    lines = ["task: chain", "c0: &c0 [x]"] + [f"c{n}: &c{n} [*c{n - 1}]" for n in range(1, links)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("task: deep\nsettings: " + DEEP + "\n", "task.yaml: not an lm-eval task file (nested too deeply)"),
        ("task: deep\nsettings: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64 levels"),
        (chain(), "nested deeper than 64 levels"),
        (bomb(), "its aliases expand to more than 100,000 values"),
        ("task: loop\nitems: &loop [*loop]\n", "an alias refers to itself"),
    ],
    ids=["deep_text", "deeper_than_64", "alias_chain", "billion_laughs", "alias_inside_itself"],
)
def test_a_hostile_task_yaml_is_one_line(workspace, capsys, content, message):
    (workspace / "task.yaml").write_text(content)
    argv = ["eval", "--model", "run/final", "--tasks", "task.yaml", "--limit", "2"]
    main_refused(capsys, workspace, argv, message)


def test_an_alias_bomb_in_the_include_path_is_refused_even_unnamed(workspace, capsys):
    """Files of --include_path that are not task files are skipped, but lm-eval reads them all the same."""
    (workspace / "tasks").mkdir()
    (workspace / "tasks" / "bomb.yaml").write_text(bomb())
    argv = ["eval", "--model", "run/final", "--include_path", "tasks", "--tasks", "bomb", "--limit", "2"]
    main_refused(capsys, workspace, argv, "tasks/bomb.yaml: its aliases expand to more than 100,000 values")


def test_a_hostile_task_yaml_in_training_is_one_line_before_anything_is_written(workspace, capsys):
    (workspace / "task.yaml").write_text(bomb())
    before = entries(workspace)
    argv = [*TRAIN, "--set", "train.eval_tasks=[task.yaml]", "--train_steps", "1", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, "its aliases expand to more than 100,000 values")
    assert entries(workspace) == before


def test_an_alias_bomb_is_refused_at_once_from_the_command_line(workspace):
    """Before the bound, walking 9**9 values for task code took minutes: the process must end in seconds."""
    (workspace / "task.yaml").write_text(bomb())
    command = [sys.executable, "-m", "smollm2", "eval", "--model", "run/final", "--tasks", "task.yaml"]
    environment = os.environ | {"PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=60, env=environment)
    assert "its aliases expand to more than 100,000 values" in one_error_line(result)


def test_lm_evals_own_task_files_are_within_the_bounds():
    """The bounds refuse no task lm-eval ships (at most ~800 values and 8 levels among its 14,000 files)."""
    import lm_eval.tasks

    from smollm2.evaluation import read_task_file

    root = Path(lm_eval.tasks.__file__).parent
    for path in [root / "hellaswag" / "hellaswag.yaml", root / "benchmarks" / "flan" / "flan_held_in.yaml"]:
        config, _ = read_task_file(path)
        assert isinstance(config, dict)


# ---------------------------------------------------------------------------------------------
# A resume on training data that changed says so


def fixed_tokenizer_run(workspace: Path) -> list[str]:
    """A 2-step run in fixed/ with data.tokenizer a file (the workspace run's): the corpus is then
    prepared again when it changes, without refusing the tokenizer."""
    shutil.copy(prepared(workspace) / "tokenizer.json", workspace / "tok.json")
    argv = [*TRAIN, "--set", "data.tokenizer=tok.json", "--out_dir", "fixed"]
    assert cli.train_main([*argv, "--train_steps", "2"]) == 0
    return [*argv, "--train_steps", "1", "--checkpoint_path", "fixed/checkpoints/step_2.pt"]


CHANGED = "warning: the training data is not the data this run trained on so far"


def test_a_resume_on_a_corpus_edited_in_place_says_so_in_one_line(workspace, capsys):
    resume = fixed_tokenizer_run(workspace)
    corpus = workspace / "input.txt"
    corpus.write_text("ROMEO: a line the run never saw.\n" + corpus.read_text())
    capsys.readouterr()
    assert cli.train_main(resume) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(CHANGED), warnings


def test_a_resume_on_the_same_data_says_nothing_of_it(workspace, capsys):
    resume = fixed_tokenizer_run(workspace)
    corpus = workspace / "input.txt"
    corpus.write_text(corpus.read_text())  # the same bytes, a new mtime: prepared again, the same tokens
    capsys.readouterr()
    assert cli.train_main(resume) == 0
    assert CHANGED not in capsys.readouterr().err


def test_a_checkpoint_older_than_data_digests_resumes_without_a_word(workspace, capsys):
    resume = fixed_tokenizer_run(workspace)
    path = workspace / "fixed" / "checkpoints" / "step_2.pt"
    state = torch.load(path, weights_only=True)
    assert isinstance(state.pop("data_digest"), str)
    torch.save(state, path)
    corpus = workspace / "input.txt"
    corpus.write_text("ROMEO: a line the run never saw.\n" + corpus.read_text())
    capsys.readouterr()
    assert cli.train_main(resume) == 0
    assert CHANGED not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Refusals come before anything is written


def test_broken_init_from_weights_are_refused_before_the_data_is_prepared(workspace, capsys):
    source = workspace / "m"
    shutil.copytree(workspace / "run" / "final", source)
    weights = load_file(source / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, source / "model.safetensors")
    before = entries(workspace)
    argv = [*TRAIN, "--set", "model.init_from=m", "--train_steps", "1", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, "m: weight norm.weight holds values that are not finite")
    assert entries(workspace) == before


def test_a_bad_optimizer_state_is_refused_before_the_data_is_prepared(workspace, capsys):
    state = torch.load(workspace / CHECKPOINT, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(state, workspace / "edited.pt")
    before = entries(workspace)
    argv = [*TRAIN, "--set", "data.prepared_dir=prep", "--train_steps", "1", "--checkpoint_path", "edited.pt"]
    train_refused(capsys, workspace, [*argv, "--out_dir", "run"], "its optimizer state does not fit the model")
    assert entries(workspace) == before


# ---------------------------------------------------------------------------------------------
# eval's stderr holds only our lines


def test_eval_on_a_new_local_jsonl_task_draws_no_data_set_bar(workspace, tmp_path):
    json_task(workspace, "mine.yaml")
    command = [sys.executable, "-m", "smollm2", "eval", "--model", "run/final", "--tasks", "mine.yaml", "--limit", "2"]
    environment = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(tmp_path / "new_cache")}
    environment.pop("HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    result = subprocess.run(command, cwd=workspace, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    assert "exact_match" in result.stdout
    assert "Generating" not in result.stderr and "examples/s" not in result.stderr, result.stderr
