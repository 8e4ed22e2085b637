"""Data and logs from elsewhere: token files whose ids are past the vocabulary or whose meta.json names
another dtype, a datatrove .ds file of random ids, a step number in metrics.jsonl or samples.md too
long to convert, a conversation far longer than data.seq_len, and a task YAML with a key lm-eval does
not know. Each ends in one line on stderr (exit 2) with every file as it was, or, where the file is a
log the command only reads, leaves the bad line out. The workspace (tests/conftest.py): a finished
4-step run in run/ (checkpoints at 2 and 4, final/, logs/), its config in config/tiny.yaml (vocab 320).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from smollm2 import chat_template, cli
from smollm2.metrics import read_metrics, read_samples
from tests.helpers import ROOT, main_refused, train_refused

TRAIN = ["--config", "config/tiny.yaml"]
CHECKPOINT = "run/checkpoints/step_4.pt"
RESUME = [*TRAIN, "--train_steps", "1", "--checkpoint_path", CHECKPOINT, "--out_dir", "run"]
HUGE = "1" * 5000  # past Python's 4,300 digits for converting text to an int
VOCAB = 320  # tests.helpers.tiny_config's model.vocab_size
TASKS = ROOT / "tests" / "eval_tasks"


def prepared(workspace: Path) -> Path:
    return workspace / "run" / "data" / f"input-{VOCAB}"


def prepared_here(workspace: Path, capsys) -> Path:
    """The run's prepared folder, prepared for this copy of the workspace (its fingerprint names the
    corpus by its absolute path), so a resume reuses it as it is."""
    assert cli.main(["prepare", *TRAIN, "--out_dir", "run"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return prepared(workspace)


def mapped_dtypes(monkeypatch) -> list[np.dtype]:
    """The dtypes every np.memmap is asked for from now on."""
    seen: list[np.dtype] = []
    original = np.memmap

    def spy(*args, **kwargs):
        seen.append(np.dtype(kwargs.get("dtype", args[1] if len(args) > 1 else np.uint8)))
        return original(*args, **kwargs)

    monkeypatch.setattr(np, "memmap", spy)
    return seen


# ---------------------------------------------------------------------------------------------
# Logs: a step number too long to convert is not a row, nor a section of samples.md (B3, B4)


HOSTILE_SECTION = f"\n## step {HUGE} (train loss 1.0000)\n\n```text\nROMEO: from elsewhere\n```\n"


def add_hostile_logs(workspace: Path) -> Path:
    logs = workspace / "run" / "logs"
    with open(logs / "metrics.jsonl", "a") as f:
        f.write('{"step": ' + HUGE + "}\n" + '{"step": 3, "loss": ' + HUGE + "}\n")
    with open(logs / "samples.md", "a") as f:
        f.write(HOSTILE_SECTION)
    return logs


def test_a_huge_step_in_the_logs_is_left_out_of_what_is_read(workspace):
    logs = workspace / "run" / "logs"
    rows, sections = read_metrics(logs / "metrics.jsonl"), read_samples(logs / "samples.md")
    add_hostile_logs(workspace)
    assert read_metrics(logs / "metrics.jsonl") == rows
    assert [(s.step, s.texts) for s in read_samples(logs / "samples.md")] == [(s.step, s.texts) for s in sections]
    assert [s.step for s in sections] == [2, 4]


def test_export_space_reads_logs_with_huge_steps(workspace, capsys):
    logs = add_hostile_logs(workspace)
    assert cli.main(["export-space", "--run", "run", "--out", "space"]) == 0, capsys.readouterr().err
    assert (workspace / "space" / "logs" / "samples.md").read_bytes() == (logs / "samples.md").read_bytes()
    assert "from elsewhere" not in (workspace / "space" / "README.md").read_text()


def test_a_resume_drops_a_section_of_a_huge_step_as_one_after_its_checkpoint(workspace, capsys):
    logs = add_hostile_logs(workspace)
    assert cli.train_main(RESUME) == 0, capsys.readouterr().err
    samples = (logs / "samples.md").read_text()
    assert HUGE not in samples and "from elsewhere" not in samples
    assert [s.step for s in read_samples(logs / "samples.md")] == [2, 4]
    assert [row["step"] for row in read_metrics(logs / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_the_app_starts_on_logs_with_huge_steps(workspace):
    from smollm2.app import build_app

    logs = add_hostile_logs(workspace)
    before = {name: (logs / name).read_bytes() for name in ("metrics.jsonl", "samples.md")}
    assert build_app(workspace / "run" / "final", logs) is not None
    assert {name: (logs / name).read_bytes() for name in before} == before


# ---------------------------------------------------------------------------------------------
# Token ids past the vocabulary: refused when the file is opened, naming it and the largest id (B5)


def test_a_reused_prepared_folder_with_ids_past_the_vocabulary_is_refused(workspace, capsys, monkeypatch):
    train = prepared_here(workspace, capsys) / "train.bin"
    train.write_bytes(b"\xff" * train.stat().st_size)
    message = f"{train.relative_to(workspace)}: holds the token id 65535, not below model.vocab_size={VOCAB}"
    train_refused(capsys, workspace, RESUME, message)


def test_eval_split_val_refuses_ids_past_the_vocabulary(workspace, capsys):
    val = prepared(workspace) / "val.bin"
    ids = np.fromfile(val, dtype="<u2")
    ids[len(ids) // 2] = VOCAB  # one id, one past the last row of the embedding
    val.write_bytes(ids.tobytes())
    argv = ["eval", "--model", "run/final", "--split", "val"]
    message = f"--split val: run/data/input-{VOCAB}/val.bin: holds the token id {VOCAB}, not below the {VOCAB} ids"
    main_refused(capsys, workspace, argv, message)


def datatrove_source(workspace: Path, ids: np.ndarray) -> list[str]:
    """A folder `tokenized/` as datatrove's DocumentTokenizer writes it (`a.ds`, its .metadata naming
    the run's tokenizer), and the settings that train on it beside input.txt."""
    folder = workspace / "tokenized"
    folder.mkdir()
    (folder / "a.ds").write_bytes(ids.astype("<u2").tobytes())
    tokenizer = f"run/data/input-{VOCAB}/tokenizer.json"
    (folder / "a.ds.metadata").write_text(f"{tokenizer}|2\n{len(ids)}\n")
    sources = "data.sources=[{path: input.txt, weight: 1}, {path: tokenized, weight: 1}]"
    return ["--set", sources, f"data.tokenizer={tokenizer}"]


def test_a_datatrove_file_of_random_ids_is_refused(workspace, capsys):
    ids = np.random.default_rng(0).integers(0, 1 << 16, size=4000)
    settings = datatrove_source(workspace, ids)
    message = f"tokenized/a.ds: holds the token id {ids.max()}, not below the {VOCAB} ids of the run's tokenizer"
    train_refused(capsys, workspace, [*TRAIN, *settings, "--train_steps", "1", "--out_dir", "fresh"], message)


def test_a_datatrove_file_of_the_tokenizers_ids_trains(workspace, capsys):
    ids = np.random.default_rng(0).integers(0, VOCAB, size=4000)
    settings = datatrove_source(workspace, ids)
    assert cli.train_main([*TRAIN, *settings, "--train_steps", "1", "--out_dir", "fresh"]) == 0, capsys.readouterr()


# ---------------------------------------------------------------------------------------------
# meta.json's dtype: only native little-endian uint16 / uint32 are memory-mapped (B5, B6)

OTHER_DTYPES = ["object", ">u2", "float16", "V2", "<u8", ["uint16"]]  # "object" mapped bytes as pointers: a segfault


def retype(folder: Path, dtype) -> None:
    """meta.json names `dtype`, its counts made to fit the token files (cut to whole items of it)."""
    meta = json.loads((folder / "meta.json").read_text()) | {"dtype": dtype}
    size = np.dtype(dtype).itemsize if isinstance(dtype, str) else 2
    for split in ("train", "val"):
        data = (folder / f"{split}.bin").read_bytes()
        (folder / f"{split}.bin").write_bytes(data[: len(data) // size * size])
        meta[f"{split}_tokens"] = len(data) // size
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
def test_a_meta_json_of_another_dtype_is_never_mapped_in_train(workspace, capsys, monkeypatch, dtype):
    retype(prepared_here(workspace, capsys), dtype)
    mapped = mapped_dtypes(monkeypatch)
    train_refused(capsys, workspace, RESUME, "(meta.json, changed since smollm2 wrote it)")
    assert mapped == []


@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
def test_a_meta_json_of_another_dtype_is_never_mapped_in_eval(workspace, capsys, monkeypatch, dtype):
    retype(prepared(workspace), dtype)
    mapped = mapped_dtypes(monkeypatch)
    argv = ["eval", "--model", "run/final", "--split", "val"]
    main_refused(capsys, workspace, argv, "--split val: run/data holds no prepared corpus; give --text FILE instead")
    assert mapped == []


def test_token_files_are_mapped_as_little_endian(workspace, capsys, monkeypatch):
    mapped = mapped_dtypes(monkeypatch)
    assert cli.main(["eval", "--model", "run/final", "--split", "val"]) == 0, capsys.readouterr().err
    assert mapped == [np.dtype("<u2")]


# ---------------------------------------------------------------------------------------------
# A conversation that cannot fit data.seq_len: refused from one rendering, in one line (B8)


def test_a_conversation_of_thousands_of_turns_is_refused_before_it_is_rendered_turn_by_turn(
    workspace, capsys, monkeypatch
):
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "la " * 10} for i in range(4000)]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines = [json.dumps({"messages": short})] * 20 + [json.dumps({"messages": turns})]
    (workspace / "chats.jsonl").write_text("\n".join(lines) + "\n")
    assert len(lines[-1]) > 160_000
    spans = chat_template.assistant_spans

    def turn_by_turn(tokenizer, messages):
        assert len(messages) < 100, "the long conversation was rendered turn by turn"
        return spans(tokenizer, messages)

    monkeypatch.setattr(chat_template, "assistant_spans", turn_by_turn)
    settings = ["--set", "data.path=chats.jsonl", "data.format=chat"]
    argv = [*TRAIN, *settings, "--train_steps", "1", "--out_dir", "fresh"]
    line = train_refused(capsys, workspace, argv, "chats.jsonl:21: the conversation renders more than")
    assert "than data.seq_len=32 tokens can hold" in line
    assert "note:" not in line
    assert not (workspace / "fresh").exists()


# ---------------------------------------------------------------------------------------------
# Task files: a key lm-eval does not know (T1); no progress bar of lm-eval's on the console (T2)


@pytest.fixture
def task_folder(workspace) -> Path:
    """tests/eval_tasks' multiple-choice task (its data from the Python beside it) in tasks/."""
    folder = workspace / "tasks"
    folder.mkdir()
    for name in ("local_data.py", "multiple_choice.yaml", "multiple_choice.jsonl"):
        shutil.copyfile(TASKS / name, folder / name)
    return folder


@pytest.mark.parametrize(
    "flags",
    [["--tasks", "tasks/multiple_choice.yaml"], ["--tasks", "local_multiple_choice", "--include_path", "tasks"]],
    ids=["named", "include_path"],
)
def test_a_task_file_with_an_unknown_key_is_one_line(workspace, task_folder, capsys, flags):
    task = task_folder / "multiple_choice.yaml"
    task.write_text(task.read_text() + "foo: 1\n")
    argv = ["eval", "--model", "run/final", *flags, "--limit", "2", "--allow_code"]
    main_refused(capsys, workspace, argv, "task file tasks/multiple_choice.yaml: unknown key 'foo'")


def test_a_task_file_with_an_unknown_key_is_one_line_in_training(workspace, task_folder, capsys):
    task = task_folder / "multiple_choice.yaml"
    task.write_text(task.read_text() + "foo: 1\n")
    settings = ["--set", "train.eval_tasks=[tasks/multiple_choice.yaml]", "train.eval_allow_code=true"]
    argv = [*TRAIN, *settings, "--train_steps", "1", "--out_dir", "fresh"]
    train_refused(capsys, workspace, argv, "task file tasks/multiple_choice.yaml: unknown key 'foo'")
    assert not (workspace / "fresh").exists()  # refused before the data was prepared: nothing written


def test_eval_draws_no_progress_bar_of_lm_evals(workspace, task_folder, capsys):
    argv = ["eval", "--model", "run/final", "--tasks", "tasks/multiple_choice.yaml", "--limit", "2", "--allow_code"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "it/s" not in err and "Tokenizing inputs" not in err and "%|" not in err, err
